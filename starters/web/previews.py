"""Preview thumbnails: the registry says which object, the roots say whether it may be read,
the decoder sandbox renders it (activities/media/preview.py), and a small cache keeps it.

Tenant checks come first: an asset is looked up by (the key's tenant, asset id), so another
tenant's asset is simply not found (404, audited by the caller). The object is then read
through the tenant's storage roots like a worker reads it (a registry row cannot point the
server outside them), at the generation that was ingested: a file changed since renders
nothing stale. The cache is keyed by tenant, asset, generation, locator and size.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from activities.media.formats import MediaLimits
from activities.media.preview import render_preview
from activities.media.sandbox import SandboxPool
from activities.runtime.lru import Lru
from activities.store.objects import store_for
from activities.store.orm import Asset
from activities.store.roots import StorageRoots
from settings import Settings
from workflows.contracts import INGESTED


class PreviewNotFound(LookupError):
    """No ingested asset with this id in the key's tenant."""


@dataclass(frozen=True)
class Preview:
    jpeg: bytes
    etag: str


class Previews:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._engine = engine
        self._roots = StorageRoots.from_settings(settings.storage_roots, settings.state_dir)
        self._limits = MediaLimits.from_settings(settings)
        self._time_limit_s = max(settings.decode_time_limit_s, settings.image_decode_time_limit_s)
        self._pool = SandboxPool.from_settings(settings)
        self._cache: Lru[tuple[str, str, str, str, int], Preview] = Lru(
            settings.web_preview_cache_items
        )
        self._slots = asyncio.Semaphore(max(1, settings.web_preview_concurrency))

    def _asset(self, tenant: str, asset_id: str) -> Asset:
        with Session(self._engine) as session:
            row = session.execute(
                select(Asset).where(
                    Asset.tenant == tenant, Asset.asset_id == asset_id, Asset.status == INGESTED
                )
            ).scalar_one_or_none()
            if row is None:
                raise PreviewNotFound(asset_id)
            session.expunge(row)
            return row

    def _render(self, asset: Asset, locator: str, side: int) -> bytes:
        roots = self._roots.for_tenant(asset.tenant)
        limit, _ = self._limits.max_bytes_for(asset.media_type)
        data = store_for(asset.uri, roots).read(asset.uri, limit, asset.generation)
        return render_preview(
            self._pool, data, asset.media_type, locator, side, self._limits, self._time_limit_s
        )

    async def get(self, tenant: str, asset_id: str, locator: str, side: int) -> Preview:
        asset = await asyncio.to_thread(self._asset, tenant, asset_id)
        key = (tenant, asset_id, asset.generation, locator, side)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        async with self._slots:
            jpeg = await asyncio.to_thread(self._render, asset, locator, side)
        tag = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        preview = Preview(jpeg, f'"{tag}"')  # the same in every server process
        self._cache.put(key, preview)
        return preview

    def close(self) -> None:
        self._pool.close()
