"""The vector store: one Milvus collection per index version, read through an alias.

Rows are keyed deterministically (``<asset_id>:<chunk>``) and written by
delete-then-insert per asset, so a re-run leaves the same rows, an object whose chunk
count changed leaves no stale chunks, and Milvus 2.3's partition-key + upsert bug (see
docs/architecture.md) cannot bite. New collections make tenant the partition key
(``IndexConfig``); older ones keep it a plain scalar field; every read filters on it.

Filters are compiled from structured values with escaped literals (``literal``), never
taken as expression strings from a caller.

One module of ~600 lines: every Milvus call goes through :class:`VectorStore` and its
guarded client, so access errors, consistency levels and filters are decided once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from settings import Settings, get_settings
from workflows.contracts import AskFilters, IndexTarget
from workflows.limits import MAX_TAG_BYTES, MAX_TAGS, filters_problem, tags_problem

MAX_URI = 2048
MAX_SNIPPET = 2048
GENERATION_PAGE = 4096  # rows per page of asset_generations (Milvus caps a query at 16384)
METRIC = "COSINE"  # every collection's metric; exact ranking (exact_hits) computes the same
HIT_FIELDS = ["asset_id", "uri", "media_type", "chunk", "created_at", "tags", "snippet"]


@dataclass
class ChunkRow:
    """One vector and what a search needs to cite it."""

    asset_id: str
    tenant: str
    uri: str
    media_type: str
    chunk: str  # locator: "image", "page:3", "frame:12.500"
    created_at: int
    tags: dict[str, str] = field(default_factory=dict)
    snippet: str = ""
    generation: str = ""  # the object generation this vector was made from

    @property
    def pk(self) -> str:
        return f"{self.asset_id}:{self.chunk}"


def literal(value: str | int | float | bool) -> str:
    """A Milvus expression literal; strings are JSON-escaped so they cannot end the literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if not isinstance(value, str):
        raise TypeError(f"unsupported filter value type {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def in_list(field_name: str, values: Iterable[str | int]) -> str:
    return f"{field_name} in [{', '.join(literal(v) for v in values)}]"


def tag_value(key: str, value: str) -> str:
    """A tag as stored: ``key=value``. Keys never contain ``=`` (``tags_problem``), so no
    two tags share a stored string."""
    return f"{key}={value}"


def stored_tags(tags: dict[str, str]) -> list[str]:
    """Tags as a chunk stores them; ValueError (never a silent cut) for tags the schema
    cannot hold exactly (workflows refuse them first: workflows/limits.py)."""
    problem = tags_problem(tags)
    if problem:
        raise ValueError(problem)
    return [tag_value(k, v) for k, v in sorted(tags.items())]


class IndexSettingsError(ValueError):
    """Index settings Milvus cannot build for this collection; the message names the setting."""


@dataclass(frozen=True)
class IndexConfig:
    """The ANN index new collections get, and the search parameters every search sends.

    Built from the ``MMRAG_INDEX_TYPE`` / ``MMRAG_HNSW_*`` / ``MMRAG_IVF_*`` settings; the
    defaults come from bench/scale.py (docs/performance.md, "Scale"). Searches send both
    ``ef`` and ``nprobe``: Milvus reads the one its index uses and ignores the other, so an
    alias moved to a version with another index type needs no extra lookup.
    """

    index_type: str = "HNSW"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 256
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    ivf_pq_m: int = 64
    ivf_pq_nbits: int = 8
    partition_key: bool = True
    partitions: int = 64
    exact_max_rows: int = 4096  # MMRAG_EXACT_SEARCH_MAX_ROWS: see VectorStore.search

    @classmethod
    def from_settings(cls, s: Settings) -> IndexConfig:
        return cls(
            index_type=s.index_type,
            hnsw_m=s.hnsw_m,
            hnsw_ef_construction=s.hnsw_ef_construction,
            hnsw_ef=s.hnsw_ef,
            ivf_nlist=s.ivf_nlist,
            ivf_nprobe=s.ivf_nprobe,
            ivf_pq_m=s.ivf_pq_m,
            ivf_pq_nbits=s.ivf_pq_nbits,
            partition_key=s.tenant_partition_key,
            partitions=s.milvus_partitions,
            exact_max_rows=s.exact_search_max_rows,
        )

    def build_params(self, dim: int) -> dict[str, int]:
        """The index's build parameters for vectors of ``dim``."""
        if self.index_type == "HNSW":
            return {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction}
        if self.index_type in ("IVF_SQ8", "IVF_FLAT"):
            return {"nlist": self.ivf_nlist}
        if self.index_type == "IVF_PQ":
            if dim % self.ivf_pq_m:
                raise IndexSettingsError(
                    f"MMRAG_IVF_PQ_M={self.ivf_pq_m} must divide the vector dimension {dim}"
                )
            return {"nlist": self.ivf_nlist, "m": self.ivf_pq_m, "nbits": self.ivf_pq_nbits}
        if self.index_type == "FLAT":
            return {}
        raise IndexSettingsError(
            f"MMRAG_INDEX_TYPE={self.index_type!r} is not one of HNSW, IVF_SQ8, IVF_PQ, "
            "IVF_FLAT, FLAT"
        )

    def add_to(self, index: Any, dim: int) -> None:
        """Add the vector field's index to pymilvus ``IndexParams``."""
        index.add_index(
            field_name="vector",
            index_type=self.index_type,
            metric_type=METRIC,
            params=self.build_params(dim),
        )

    def search_params(self, top_k: int) -> dict[str, object]:
        return {
            "metric_type": METRIC,
            "params": {"ef": max(self.hnsw_ef, top_k), "nprobe": self.ivf_nprobe},
        }


class VectorStoreError(RuntimeError):
    """A Milvus call failed; the message is Milvus's own. Raised without the pymilvus
    exception chained: its cause chain can be cyclic, which breaks failure reporting."""


class VectorStoreAccessError(VectorStoreError):
    """Milvus refused this worker's credentials or a privilege its user lacks.

    A deployment mistake, not a bug: the message says which user, which privilege and what
    to change, and never contains the token. Still retryable, so runs resume once the
    worker is restarted with the right token (or the role is granted the privilege).
    ``reason`` is the refusal alone, without the advice for workers.
    """

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}. {hint}")
        self.reason = reason


#: What to do when Milvus refuses a call: the users `mmrag milvus provision-rbac` creates.
RBAC_HINT = (
    "workers that write (cpu: ingest, re-index, forget; encode: vectors) need the "
    "mmrag_ingest / mmrag_encode users, read-only clients mmrag_query; set the worker's "
    "MMRAG_MILVUS_TOKEN (or MMRAG_MILVUS_TOKEN_CPU / _ENCODE) to that user's user:password "
    "and run `mmrag milvus provision-rbac` as root to create or repair the roles "
    "(docs/security-reference.md, Milvus RBAC)"
)


def token_user(token: str) -> str:
    """The user name of a ``user:password`` token, never the password; "" for API keys."""
    user, sep, _ = token.partition(":")
    return user if sep else ""


def _rpc_status(error: BaseException) -> tuple[str, str] | None:
    """(gRPC status name, details) of a gRPC error in ``error`` or its causes, else None.

    pymilvus raises PERMISSION_DENIED as the bare ``grpc.RpcError`` and an authentication
    failure at connect time as a generic "Fail connecting" MilvusException caused by one.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, grpc.RpcError) and isinstance(current, grpc.Call):
            return current.code().name, str(current.details() or "")
        current = current.__cause__ or current.__context__
    return None


def access_error(action: str, error: BaseException, user: str) -> VectorStoreAccessError | None:
    """A clear :class:`VectorStoreAccessError` if Milvus refused credentials or a privilege."""
    status = _rpc_status(error)
    if status is None:
        return None
    code, details = status
    who = f"user {user!r}" if user else "this token"
    if code == "PERMISSION_DENIED":
        # Milvus 2.3: "PrivilegeInsert: permission deny to mmrag_query"
        privilege = details.split(":", 1)[0].removeprefix("Privilege") or "?"
        return VectorStoreAccessError(
            f"Milvus refused {action}: {who} lacks the {privilege} privilege (Milvus: {details})",
            RBAC_HINT,
        )
    if code == "UNAUTHENTICATED":
        return VectorStoreAccessError(
            f"Milvus refused the credentials of {who} ({details}): the user does not exist or "
            "the password is wrong",
            RBAC_HINT,
        )
    return None


class _GuardedClient:
    """``MilvusClient`` whose errors arrive as :class:`VectorStoreError` (retryable), and
    refusals as :class:`VectorStoreAccessError` naming the user and privilege."""

    def __init__(self, client: MilvusClient, user: str = "") -> None:
        self._client = client
        self._user = user

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except (MilvusException, grpc.RpcError) as e:
                refused = access_error(name, e, self._user)
                if refused is not None:
                    raise refused from None
                if isinstance(e, MilvusException):
                    message = f"Milvus {name} failed: {e.message} (code {e.code})"
                else:
                    message = f"Milvus {name} failed: {_rpc_status(e) or e!r}"
                raise VectorStoreError(message) from None

        return call


def connect(uri: str, token: str = "") -> MilvusClient:
    """A ``MilvusClient``; refused credentials raise :class:`VectorStoreAccessError`.

    pymilvus reports a wrong password as "Fail connecting ... server unavailable"; the
    message here says what really happened, and never echoes the token.
    """
    try:
        return MilvusClient(uri=uri, token=token or "")
    except (MilvusException, grpc.RpcError) as e:
        refused = access_error("the connection", e, token_user(token))
        if refused is not None:
            raise refused from None
        detail = e.message if isinstance(e, MilvusException) else repr(e)
        raise VectorStoreError(f"Milvus at {uri} is unreachable: {detail}") from None


def guarded_client(uri: str, token: str = "") -> Any:
    """A ``MilvusClient`` (duck-typed) whose errors are :class:`VectorStoreError` and whose
    refusals are :class:`VectorStoreAccessError`; for admin tools such as RBAC provisioning."""
    return _GuardedClient(connect(uri, token), token_user(token))


class VectorStore:
    """A thin, typed facade over ``MilvusClient`` for the calls mmrag makes."""

    def __init__(self, uri: str, token: str = "", index: IndexConfig | None = None) -> None:
        self.client: Any = guarded_client(uri, token)
        self.index = index or IndexConfig.from_settings(get_settings())
        self._lock = threading.Lock()
        self._fields: dict[str, frozenset[str]] = {}

    def fields_of(self, collection: str) -> frozenset[str]:
        """The collection's field names, cached: a version created by an older mmrag lacks
        newer fields (e.g. ``generation``), and its rows are written without them."""
        if collection not in self._fields:
            described = self.client.describe_collection(collection)
            self._fields[collection] = frozenset(f["name"] for f in described["fields"])
        return self._fields[collection]

    # -- collections and aliases -------------------------------------------------------
    def ensure_collection(self, name: str, dim: int, model: dict[str, str] | None = None) -> None:
        """Create the collection of one index version; ``model`` is recorded in its
        description so query encoders can find which model the alias currently needs."""
        with self._lock:
            if self.client.has_collection(name):
                return
            schema = self.client.create_schema(
                auto_id=False,
                enable_dynamic_field=False,
                description=json.dumps({"mmrag_model": model or {}}),
            )
            schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("asset_id", DataType.VARCHAR, max_length=64)
            # Partition key (new collections; MMRAG_TENANT_PARTITION_KEY): a search filtered
            # on one tenant reads that tenant's partition only.
            schema.add_field(
                "tenant",
                DataType.VARCHAR,
                max_length=128,
                is_partition_key=self.index.partition_key,
            )
            schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI)
            schema.add_field("media_type", DataType.VARCHAR, max_length=64)
            schema.add_field("chunk", DataType.VARCHAR, max_length=64)
            schema.add_field("created_at", DataType.INT64)
            schema.add_field(
                "tags",
                DataType.ARRAY,
                element_type=DataType.VARCHAR,
                max_capacity=MAX_TAGS,
                max_length=MAX_TAG_BYTES,
            )
            schema.add_field("snippet", DataType.VARCHAR, max_length=MAX_SNIPPET)
            schema.add_field("generation", DataType.VARCHAR, max_length=128)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.prepare_index_params()
            self.index.add_to(index, dim)
            partitions = {"num_partitions": self.index.partitions}
            self.client.create_collection(
                name,
                schema=schema,
                index_params=index,
                **(partitions if self.index.partition_key else {}),
            )
            self.client.load_collection(name)

    def point_alias(self, alias: str, collection: str) -> None:
        """Make ``alias`` name ``collection`` in one step (create or alter)."""
        with self._lock:
            if alias in self.client.list_aliases(collection).get("aliases", []):
                return
            exists = any(
                alias in self.client.list_aliases(name).get("aliases", [])
                for name in self.client.list_collections()
            )
            if exists:
                self.client.alter_alias(collection_name=collection, alias=alias)
            else:
                self.client.create_alias(collection_name=collection, alias=alias)

    # -- writes -----------------------------------------------------------------------
    def replace_assets(
        self,
        collection: str,
        tenant: str,
        asset_ids: Sequence[str],
        rows: Sequence[ChunkRow],
        vectors: np.ndarray,
    ) -> int:
        """Delete every chunk of ``asset_ids``, then insert ``rows``: idempotent.

        Assets in ``asset_ids`` without rows (they failed this time) end with no vectors.
        """
        if asset_ids:
            self.delete_assets(collection, tenant, asset_ids)
        if not rows:
            return 0
        data = [
            {
                "pk": r.pk,
                "asset_id": r.asset_id,
                "tenant": r.tenant,
                "uri": r.uri[:MAX_URI],
                "media_type": r.media_type,
                "chunk": r.chunk,
                "created_at": int(r.created_at),
                "tags": stored_tags(r.tags),
                "snippet": r.snippet[:MAX_SNIPPET],
                "generation": r.generation[:128],
                "vector": vec,
            }
            for r, vec in zip(rows, vectors.astype(np.float32).tolist(), strict=True)
        ]
        known = self.fields_of(collection)
        if not known.issuperset(data[0]):
            data = [{k: v for k, v in row.items() if k in known} for row in data]
        result = self.client.insert(collection, data)
        return int(result.get("insert_count", len(data)))

    def replace_chunks(
        self, collection: str, tenant: str, rows: Sequence[ChunkRow], vectors: np.ndarray
    ) -> int:
        """Delete these rows' primary keys, then insert them: one asset's chunks written a
        group at a time (long PDFs and videos), idempotent when a group is written twice.

        The delete names primary keys only: Milvus then deletes directly, while any other
        clause makes it query first (~300 ms per call here). Keys embed the asset id, which
        is derived from the tenant, so no other tenant's row can match.
        """
        if not rows:
            return 0
        self.client.delete(collection, filter=in_list("pk", [r.pk for r in rows]))
        return self.replace_assets(collection, tenant, [], rows, vectors)

    def delete_stale_chunks(
        self, collection: str, tenant: str, asset_id: str, keep_pks: Sequence[str]
    ) -> None:
        """Delete an asset's chunks other than ``keep_pks`` (left by an older version)."""
        expr = f"tenant == {literal(tenant)} and asset_id == {literal(asset_id)}"
        if keep_pks:
            expr += f" and not ({in_list('pk', keep_pks)})"
        self.client.delete(collection, filter=expr)

    def delete_assets(
        self, collection: str, tenant: str, asset_ids: Sequence[str], strong: bool = False
    ) -> None:
        """Delete every chunk of these assets.

        Milvus resolves a delete-by-expression with a query at its default (bounded)
        consistency, so rows inserted a moment ago can survive it. ``strong`` reads the
        primary keys with Strong consistency first and deletes those: forget and
        re-index reconciliation use it, since a resurrected row there is a correctness bug.
        """
        expr = f"tenant == {literal(tenant)} and {in_list('asset_id', asset_ids)}"
        if not strong:
            self.client.delete(collection, filter=expr)
            return
        rows = self.client.query(
            collection, filter=expr, output_fields=["pk"], consistency_level="Strong", limit=16384
        )
        if rows:
            self.client.delete(collection, ids=[r["pk"] for r in rows])

    def retag_assets(
        self, collection: str, tenant: str, asset_ids: Sequence[str], tags: dict[str, str]
    ) -> set[str]:
        """Rewrite these assets' rows with ``tags``, vectors and all else as stored (an
        unchanged object ingested again with other tags is not re-encoded); returns the
        asset ids that had rows. Delete then insert by primary key, a page at a time, never
        upsert (see the module docstring); a retry rewrites the same rows."""
        if not asset_ids:
            return set()
        scope = f"tenant == {literal(tenant)} and {in_list('asset_id', asset_ids)}"
        known = sorted(self.fields_of(collection))
        found: set[str] = set()
        last = ""
        while True:
            rows = self.client.query(
                collection,
                filter=f"({scope}) and pk > {literal(last)}",
                output_fields=known,
                limit=GENERATION_PAGE,
                consistency_level="Strong",
            )
            if not rows:
                return found
            data = [{k: row[k] for k in known if k in row} for row in rows]
            for row in data:
                row["tags"] = stored_tags(tags)
                found.add(str(row["asset_id"]))
            self.client.delete(collection, ids=[row["pk"] for row in data])
            self.client.insert(collection, data)
            if len(rows) < GENERATION_PAGE:
                return found
            last = max(str(row["pk"]) for row in rows)

    def drop(self, collection: str) -> None:
        with self._lock:
            if self.client.has_collection(collection):
                self.client.drop_collection(collection)

    def alias_model(self, alias: str) -> tuple[str, dict[str, str]] | None:
        """The collection the alias names now and the model recorded on it; None when the
        alias does not exist yet (nothing indexed). An unreachable Milvus still raises."""
        try:
            collection = self.client.describe_alias(alias)["collection_name"]
        except VectorStoreAccessError:
            raise
        except VectorStoreError as e:
            if "not found" in str(e) or "not exist" in str(e):
                return None
            raise
        description = self.client.describe_collection(collection).get("description", "")
        try:
            model = json.loads(description).get("mmrag_model", {})
        except ValueError:
            model = {}
        return collection, model

    def asset_generations(self, collection: str, tenant: str = "") -> dict[tuple[str, str], str]:
        """(tenant, asset_id) -> generation of every asset with a vector (Strong read).

        Paged by primary key with a Strong query per page. pymilvus's ``query_iterator``
        is not used: against Milvus 2.3 it cannot get a server timestamp and falls back to a
        client-side one that misses the most recent insert (measured: the 5 rows inserted
        just before were absent, every time), and reconciliation must see every row.
        """
        scope = f"tenant == {literal(tenant)}" if tenant else 'pk != ""'
        found: dict[tuple[str, str], str] = {}
        last = ""
        while True:
            # Query results with a limit are the smallest primary keys matching the filter
            # (segments reduce by pk), so "pk > last" pages through them all.
            rows = self.client.query(
                collection,
                filter=f"({scope}) and pk > {literal(last)}",
                output_fields=["pk", "tenant", "asset_id", "generation"],
                limit=GENERATION_PAGE,
                consistency_level="Strong",
            )
            for row in rows:
                found[(row["tenant"], row["asset_id"])] = row["generation"]
            if len(rows) < GENERATION_PAGE:
                return found
            last = max(row["pk"] for row in rows)

    def chunk_rows(self, collection: str, tenant: str, asset_ids: Sequence[str]) -> list[ChunkRow]:
        """Every chunk row (without its vector) of these assets of one tenant, paged by
        primary key like :meth:`asset_generations`: what the lexical index copies from the
        rows an encode batch just wrote (activities/store/lexical.py), so Strong: a row
        inserted by another process is visible only after Milvus's next time tick (an
        ``Eventually`` read found none of 108 batches' rows; the stack sets the tick to 50
        ms, docs/performance.md)."""
        if not asset_ids:
            return []
        scope = f"tenant == {literal(tenant)} and {in_list('asset_id', asset_ids)}"
        fields_ = ["pk", "asset_id", "uri", "media_type", "chunk", "created_at", "tags", "snippet"]
        found: list[ChunkRow] = []
        last = ""
        while True:
            rows = self.client.query(
                collection,
                filter=f"({scope}) and pk > {literal(last)}",
                output_fields=fields_,
                limit=GENERATION_PAGE,
                consistency_level="Strong",
            )
            for row in rows:
                tags = dict(str(t).partition("=")[::2] for t in row.get("tags") or [])
                found.append(
                    ChunkRow(
                        asset_id=row["asset_id"],
                        tenant=tenant,
                        uri=row["uri"],
                        media_type=row["media_type"],
                        chunk=row["chunk"],
                        created_at=int(row["created_at"]),
                        tags=tags,
                        snippet=row.get("snippet") or "",
                    )
                )
            if len(rows) < GENERATION_PAGE:
                return found
            last = max(row["pk"] for row in rows)

    # -- reads ------------------------------------------------------------------------
    def count(self, collection: str, tenant: str | None = None, strong: bool = True) -> int:
        expr = f"tenant == {literal(tenant)}" if tenant is not None else ""
        rows = self.client.query(
            collection,
            filter=expr,
            output_fields=["count(*)"],
            consistency_level="Strong" if strong else "Bounded",
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def pks(self, collection: str, tenant: str) -> list[str]:
        rows = self.client.query(
            collection,
            filter=f"tenant == {literal(tenant)}",
            output_fields=["pk"],
            consistency_level="Strong",
            limit=16384,
        )
        return sorted(r["pk"] for r in rows)

    def search(
        self,
        collection: str,
        vector: Sequence[float],
        tenant: str,
        top_k: int,
        extra_filter: str = "",
        strong: bool = False,
    ) -> list[dict[str, object]]:
        """Nearest chunks of one tenant; ``extra_filter`` must come from this module's helpers.

        Milvus 2.3.5's filtered HNSW search can return fewer hits than the tenant has
        matching rows when the filter keeps a tiny share of a segment (milvus-io/milvus
        #28603, #33933; measured in docs/performance.md). So a search that comes back
        short counts the matching rows, and when it missed some and there are at most
        ``IndexConfig.exact_max_rows`` of them, ranks them all exactly instead: a small
        tenant always gets its true top-k. A full answer costs no extra round trip.
        """
        expr = f"tenant == {literal(tenant)}"
        if extra_filter:
            expr = f"{expr} and ({extra_filter})"
        consistency = "Strong" if strong else "Bounded"
        hits = self.client.search(
            collection,
            data=[list(vector)],
            filter=expr,
            limit=top_k,
            output_fields=HIT_FIELDS,
            search_params=self.index.search_params(top_k),
            consistency_level=consistency,
        )
        out = []
        for hit in hits[0] if hits else []:
            entity = dict(hit.get("entity", {}))
            entity["score"] = float(hit.get("distance", 0.0))
            entity["pk"] = hit.get("id")
            out.append(entity)
        if len(out) >= top_k or not self.index.exact_max_rows:
            return out
        rows = self.client.query(
            collection,
            filter=expr,
            output_fields=["count(*)"],
            consistency_level=consistency,
        )
        matching = int(rows[0]["count(*)"]) if rows else 0
        if matching <= len(out) or matching > self.index.exact_max_rows:
            return out
        return self.exact_hits(collection, vector, expr, top_k, consistency)

    def exact_hits(
        self,
        collection: str,
        vector: Sequence[float],
        expr: str,
        top_k: int,
        consistency: str,
    ) -> list[dict[str, object]]:
        """The ``top_k`` rows matching ``expr`` by exact cosine similarity, in the shape
        :meth:`search` returns; reads every matching row with its vector, a page (by
        primary key, under Milvus's 16384-row cap) at a time, so only for few rows."""
        entities: list[dict[str, object]] = []
        vectors: list[list[float]] = []
        last = ""
        while True:
            rows = self.client.query(
                collection,
                filter=f"({expr}) and pk > {literal(last)}",
                output_fields=["pk", "vector", *HIT_FIELDS],
                limit=GENERATION_PAGE,
                consistency_level=consistency,
            )
            for row in rows:
                vectors.append(row.pop("vector"))
                entities.append({k: row[k] for k in HIT_FIELDS if k in row} | {"pk": row["pk"]})
            if len(rows) < GENERATION_PAGE:
                break
            last = max(str(row["pk"]) for row in rows)
        if not entities:
            return []
        matrix = np.asarray(vectors, dtype=np.float32)
        query = np.asarray(vector, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        scores = (matrix @ query) / np.maximum(norms, 1e-12)
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [entities[i] | {"score": float(scores[i])} for i in best]


@lru_cache(maxsize=4)
def get_store(uri: str, token: str = "") -> VectorStore:
    """One client per process and endpoint: connections are expensive to set up."""
    return VectorStore(uri, token)


class BadFilter(ValueError):
    """Filter values Milvus could not run as given; the message says what to fix."""


def compile_filters(
    media_types: Sequence[str] = (),
    created_after: int = 0,
    created_before: int = 0,
    tags: dict[str, str] | None = None,
    asset_ids: Sequence[str] = (),
) -> str:
    """Structured filter values -> one Milvus expression; values can only ever be literals.

    Raises BadFilter for values that would not compile to exactly the filter asked for (a
    tag key with ``=``, more than 64 tags, a time outside INT64, ...): a caller's mistake
    to report at once, never to retry."""
    problem = filters_problem(
        AskFilters(
            list(media_types), created_after, created_before, dict(tags or {}), list(asset_ids)
        )
    )
    if problem:
        raise BadFilter(problem)
    clauses: list[str] = []
    if media_types:
        clauses.append(in_list("media_type", media_types))
    if created_after:
        clauses.append(f"created_at >= {int(created_after)}")
    if created_before:
        clauses.append(f"created_at < {int(created_before)}")
    for key, value in sorted((tags or {}).items()):
        clauses.append(f"array_contains(tags, {literal(tag_value(key, value))})")
    if asset_ids:
        clauses.append(in_list("asset_id", asset_ids))
    return " and ".join(clauses)


def model_of(target: IndexTarget) -> dict[str, str]:
    """What a collection's description records about its index version."""
    return {
        "version": str(target.version),
        "model": target.model,
        "pretrained": target.pretrained,
        "checkpoint": target.checkpoint,
        "dim": str(target.dim),
    }
