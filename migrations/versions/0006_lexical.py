"""The lexical index: every chunk's words in Postgres full-text search, beside the registry.

CLIP matches exact tokens (a part number, a name, an invoice id) worst, and a page's text
layer reaches it through a 77-token context. ``lexical_chunks`` holds one row per chunk that
has any words: its passage or OCR text, its caption, its file name and its tags, with a
weighted ``tsvector`` (text A, caption and tags B, file name C) kept by Postgres itself
(a generated column, so a caption written later re-weights the row in the same statement)
and a GIN index over it. Rows are keyed like the Milvus rows, ``(tenant, asset_id, chunk)``;
the scalar columns are the ones Ask's structured filters read (activities/store/lexical.py
compiles them as the Milvus filters are, with bound parameters only).

``content_hash`` and ``caption`` let a caption be reused for unchanged content (the caption
cache looks rows up by hash; the partial index serves it).

The cpu workers' login (``mmrag_ingest``: ingest, re-index, forget) reads and writes rows;
the query login (``mmrag_query``) only reads them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, TSVECTOR

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The text search configuration of the stored vectors and of every query against them
#: (activities/store/lexical.py TS_CONFIG must equal it): English stemming and stop words.
TS_CONFIG = "english"

_DOCUMENT = (
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(body, '')), 'A') || "
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(caption, '')), 'B') || "
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(tag_text, '')), 'B') || "
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(name, '')), 'C')"
)


def upgrade() -> None:
    op.create_table(
        "lexical_chunks",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("asset_id", sa.String(64), primary_key=True),
        sa.Column("chunk", sa.String(255), primary_key=True),
        sa.Column("uri", sa.Text, nullable=False, server_default=""),
        sa.Column("media_type", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.BigInteger, nullable=False, server_default="0"),
        # Tags as the Milvus rows store them, "key=value", for exact filter matches.
        sa.Column("tags", ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("tag_text", sa.Text, nullable=False, server_default=""),
        sa.Column("name", sa.Text, nullable=False, server_default=""),
        sa.Column("body", sa.Text, nullable=False, server_default=""),
        sa.Column("origin", sa.String(16), nullable=False, server_default=""),
        sa.Column("caption", sa.Text, nullable=False, server_default=""),
        sa.Column("content_hash", sa.String(128), nullable=False, server_default=""),
        sa.Column("document", TSVECTOR, sa.Computed(_DOCUMENT, persisted=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_index(
        "lexical_chunks_document", "lexical_chunks", ["document"], postgresql_using="gin"
    )
    op.create_index(
        "lexical_chunks_content_hash",
        "lexical_chunks",
        ["content_hash"],
        postgresql_where=sa.text("content_hash <> '' AND caption <> ''"),
    )
    op.execute("REVOKE ALL ON lexical_chunks FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON lexical_chunks TO mmrag_ingest")
    op.execute("GRANT SELECT ON lexical_chunks TO mmrag_query")


def downgrade() -> None:
    op.drop_table("lexical_chunks")
