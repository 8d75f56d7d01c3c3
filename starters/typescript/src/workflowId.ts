import { createHash } from 'node:crypto';

import type { IngestBatchInput } from './contracts';

/**
 * `json.dumps(value, sort_keys=True)` exactly as Python writes it: ", " and ": " separators,
 * sorted object keys, non-ASCII characters as lowercase `\uXXXX` escapes.
 */
export function pythonJson(value: unknown): string {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new Error(`cannot encode ${value} as JSON`);
    return String(value);
  }
  if (typeof value === 'string') {
    return JSON.stringify(value).replace(
      /[\u0080-\uffff]/g,
      (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'),
    );
  }
  if (Array.isArray(value)) return '[' + value.map(pythonJson).join(', ') + ']';
  const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
  entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return '{' + entries.map(([k, v]) => `${pythonJson(k)}: ${pythonJson(v)}`).join(', ') + '}';
}

/**
 * The workflow id the Python starters give the same ingest (`starters/ingest.py`
 * `batch_workflow_id`): same tenant, sources, tags and force flag, same id, so starting it
 * again from any language attaches to the running ingest instead of starting a second one.
 */
export function batchWorkflowId(input: IngestBatchInput): string {
  const key = pythonJson([input.sources, input.tags ?? {}, input.force ?? false]);
  const digest = createHash('sha256').update(key, 'utf8').digest('hex').slice(0, 16);
  return `ingest-batch/${input.tenant}/${digest}`;
}
