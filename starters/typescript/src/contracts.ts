/**
 * mmrag's public API as TypeScript types: a mirror of workflows/contracts.py.
 *
 * Workflows are started by *name* on a task queue with one JSON argument whose keys are the
 * Python field names below (snake_case, as they travel). Fields are only ever added with
 * defaults, so an optional field here may be left out and the worker fills in its default.
 * tests/test_starters.py checks that every interface here matches its Python dataclass.
 */

export const CONTRACT_VERSION = 4;

// Task queues. Starters use TASK_QUEUE: the workflows route their own activities to the GPU
// queues. An Ask may instead start on QUERY_TASK_QUEUE where a query worker is deployed
// (`mmrag worker --role query`): same input and result, the query encoded on that worker.
export const TASK_QUEUE = 'mmrag';
export const ENCODE_TASK_QUEUE = 'mmrag-gpu-encode';
export const GENERATE_TASK_QUEUE = 'mmrag-gpu-generate';
export const QUERY_TASK_QUEUE = 'mmrag-query';

// Workflow type names.
export const INGEST_BATCH_WORKFLOW = 'IngestBatch';
export const INGEST_ASSET_WORKFLOW = 'IngestAsset';
export const ASK_WORKFLOW = 'Ask';
export const REINDEX_WORKFLOW = 'Reindex';
export const FORGET_WORKFLOW = 'Forget';
export const WATCH_PREFIX_WORKFLOW = 'WatchPrefix';

/** Outcome statuses of one object in an ingest. */
export type AssetStatus = 'ingested' | 'unchanged' | 'retagged' | 'failed' | 'skipped';

// -- Ingest -------------------------------------------------------------------------------

/** Input of `IngestAsset`: one object (`file://` or `gs://` URI, or an absolute path on the workers). */
export interface IngestAssetInput {
  tenant: string;
  uri: string;
  tags?: Record<string, string>;
  /** Re-encode even when the object's generation is unchanged. */
  force?: boolean;
  /** Re-ingest an object that was forgotten (Forget). */
  allow_forgotten?: boolean;
}

/**
 * Input of `IngestBatch`: folders, prefixes or objects, ingested page by page. The
 * continuation state (`cursor_source`, `cursor_page_token`, `totals`) is the workflow's
 * own; callers leave it out.
 */
export interface IngestBatchInput {
  tenant: string;
  /** `file://` URIs, `gs://bucket/prefix` URIs or absolute paths, as the workers see them. */
  sources: string[];
  tags?: Record<string, string>;
  force?: boolean;
  /** Objects per encode activity; 0: the worker's MMRAG_BATCH_SIZE. */
  batch_size?: number;
  page_size?: number;
  max_concurrent_batches?: number;
  encode_heartbeat_timeout_s?: number;
  allow_forgotten?: boolean;
}

/** What happened to one object. */
export interface AssetOutcome {
  uri: string;
  asset_id: string;
  status: AssetStatus;
  generation: string;
  /** Why it failed, in words a user can act on. */
  reason: string;
  /** Vectors written for it. */
  chunks: number;
  /** e.g. the name or declared type disagrees with the bytes; frame cap hit. */
  note: string;
}

/** Output of `IngestBatch` and `IngestAsset`. */
export interface IngestResult {
  tenant: string;
  index_version: number;
  seen: number;
  ingested: number;
  unchanged: number;
  failed: number;
  vectors: number;
  failures: AssetOutcome[];
  skipped: number;
  /** unchanged objects whose tags changed: updated without re-encoding */
  retagged: number;
}

/** Answer of the `progress` query on `IngestBatch`. */
export interface IngestProgress {
  tenant: string;
  source: string;
  sources_done: number;
  sources_total: number;
  seen: number;
  ingested: number;
  unchanged: number;
  failed: number;
  in_flight: number;
}

// -- Ask ----------------------------------------------------------------------------------

/** Structured filters; compiled with escaped literals, never taken as an expression. */
export interface AskFilters {
  /** e.g. ["image/png"] */
  media_types?: string[];
  /** Epoch seconds, inclusive; 0: no bound. */
  created_after?: number;
  /** Epoch seconds, exclusive; 0: no bound. */
  created_before?: number;
  /** Every pair must match. */
  tags?: Record<string, string>;
  asset_ids?: string[];
}

/** Input of `Ask`: text, an image (URI or small inline base64), or both (hybrid). */
export interface AskInput {
  tenant: string;
  text?: string;
  image_uri?: string;
  /** At most 256 KiB; larger query images go by URI. */
  image_base64?: string;
  top_k?: number;
  filters?: AskFilters;
  /** Weight of the image vector in a hybrid query. */
  hybrid_weight?: number;
  rerank?: boolean;
  /** false: retrieval only, an extractive answer. */
  generate?: boolean;
  max_answer_tokens?: number;
  /**
   * Fail (a ScheduleToStart timeout, safe to retry) when no encode worker takes the query
   * within this many seconds.
   */
  encode_schedule_to_start_s?: number;
}

/** One retrieved chunk, cited in the answer as `[id]`. */
export interface Source {
  /** "S1", "S2", ... in rank order. */
  id: string;
  asset_id: string;
  uri: string;
  score: number;
  media_type: string;
  /** Locator: "image", "page:3", "frame:12.500". */
  chunk: string;
  snippet: string;
}

/** Output of `Ask`. */
export interface AskResult {
  answer: string;
  sources: Source[];
  latency_ms: number;
  stage_ms: Record<string, number>;
  degraded: boolean;
  degraded_reason: string;
  /** generated | extractive | refused | degraded | none */
  answer_kind: string;
  index_version: number;
  encoder_model: string;
  llm_model: string;
}

// -- Lifecycle: re-index, forget, watch ---------------------------------------------------

/**
 * Input of `Reindex` (`mode`: "full" builds a new index version and swaps the alias;
 * "incremental" brings the active version up to date). The continuation state
 * (`target_version`, `cursor`, `done`, `failed`, `total`, `phase`, `embedded`) is the workflow's own.
 */
export interface ReindexInput {
  mode?: 'full' | 'incremental';
  tenant?: string;
  model?: string;
  pretrained?: string;
  checkpoint?: string;
  batch_size?: number;
  max_concurrent_batches?: number;
  grace_period_hours?: number;
}

export interface ReindexProgress {
  mode: string;
  tenant: string;
  /** preparing | embedding | verifying | swapping | done */
  phase: string;
  target_version: number;
  done: number;
  total: number;
  failed: number;
  rate_per_s: number;
  eta_s: number;
}

export interface ReindexResult {
  mode: string;
  tenant: string;
  index_version: number;
  previous_version: number;
  embedded: number;
  failed: number;
  verified_assets: number;
  swapped: boolean;
  /** new failures, and (note "still failing") assets not retried until they change */
  failures: AssetOutcome[];
  still_failing: number;
}

/** Input of `Forget`: one asset, every asset under a URI prefix, or a tag match. */
export interface ForgetInput {
  tenant: string;
  asset_id?: string;
  uri_prefix?: string;
  tags?: Record<string, string>;
  /** Stored in the tombstone after PII redaction: a ticket number, not a name. */
  reason?: string;
  delete_object?: boolean;
  allow_reingest?: boolean;
  if_generation?: string;
}

export interface ForgetResult {
  tenant: string;
  forgotten: number;
  objects_deleted: number;
  index_versions: number[];
  /** delete_object was asked but the object was left: never ingested successfully, outside
   * the tenant's storage roots, or changed since it was ingested. */
  objects_kept: number;
}

/** Input of `WatchPrefix` (`passes` is continuation state, the workflow's own). */
export interface WatchPrefixInput {
  tenant: string;
  prefix: string;
  tags?: Record<string, string>;
  interval_s?: number;
}
