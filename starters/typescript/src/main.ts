#!/usr/bin/env node
/**
 * Start mmrag's workflows from TypeScript, by name, with JSON input: IngestBatch (waits for
 * its result), then Ask; prints one JSON object with both results.
 *
 * Connects the way the `temporal` CLI does (@temporalio/envconfig): TEMPORAL_ADDRESS,
 * TEMPORAL_NAMESPACE, TEMPORAL_API_KEY (Temporal Cloud), the TLS variables, or a
 * temporal.toml profile (TEMPORAL_PROFILE, TEMPORAL_CONFIG_FILE). With payload encryption on,
 * TEMPORAL_CODEC_ENDPOINT (and TEMPORAL_CODEC_AUTH) name the codec server, as for the CLI.
 * MMRAG_AUTH_TOKEN is the credential every run carries in the `mmrag_auth` header
 * (src/credential.ts).
 */
import { randomUUID } from 'node:crypto';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { Client, Connection, WorkflowFailedError } from '@temporalio/client';
import type { ConnectionOptions } from '@temporalio/client';
import { loadClientConnectConfig } from '@temporalio/envconfig';

import {
  ASK_WORKFLOW,
  INGEST_BATCH_WORKFLOW,
  TASK_QUEUE,
  type AskInput,
  type AskResult,
  type IngestBatchInput,
  type IngestProgress,
  type IngestResult,
} from './contracts';
import { TOKEN_ENV, credentialInterceptor } from './credential';
import { RemoteCodec } from './remoteCodec';
import { batchWorkflowId } from './workflowId';

const USAGE = `usage: mmrag-starter --tenant TENANT [--source PATH_OR_URI]... [--tag K=V]... [--force]
                     [--batch-size N] [--question TEXT] [--image-uri URI] [--top-k N]
                     [--media-type TYPE]... [--no-generate] [--no-rerank] [--timeout-s S]
                     [--connect-timeout-s S] [--dry-run]

Ingests the sources (IngestBatch, waiting for its result), then asks the question (Ask),
and prints {"ingest": {"workflow_id", "result"}, "ask": {"workflow_id", "result"}} as JSON.
--timeout-s: stop waiting for a workflow after S seconds (it goes on; 0: wait).
Either part is skipped when its options are absent. Sources are file:// or gs:// URIs, or
local paths (made absolute here: the workers must see the same files).

Connection: TEMPORAL_ADDRESS (default localhost:7233), TEMPORAL_NAMESPACE (default),
TEMPORAL_API_KEY, TEMPORAL_TLS_*, or a temporal.toml profile (TEMPORAL_PROFILE).
Payload encryption: TEMPORAL_CODEC_ENDPOINT (mmrag codec-server), TEMPORAL_CODEC_AUTH.
Credential: MMRAG_AUTH_TOKEN, a token for the tenant (\`mmrag token issue --tenant T --role writer\`;
an Ask needs role reader, an ingest writer).
Exit status: 0 ok, 1 a workflow failed or an ingest had failed objects, 2 usage or connection.`;

class UsageError extends Error {}

interface Options {
  tenant: string;
  sources: string[];
  tags: Record<string, string>;
  force: boolean;
  batchSize: number;
  question: string;
  imageUri: string;
  topK: number;
  mediaTypes: string[];
  generate: boolean;
  rerank: boolean;
  timeoutS: number;
  connectTimeoutS: number;
  dryRun: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      tenant: { type: 'string' },
      source: { type: 'string', multiple: true, default: [] },
      tag: { type: 'string', multiple: true, default: [] },
      force: { type: 'boolean', default: false },
      'batch-size': { type: 'string', default: '0' },
      question: { type: 'string', default: '' },
      'image-uri': { type: 'string', default: '' },
      'top-k': { type: 'string', default: '5' },
      'media-type': { type: 'string', multiple: true, default: [] },
      'no-generate': { type: 'boolean', default: false },
      'no-rerank': { type: 'boolean', default: false },
      'timeout-s': { type: 'string', default: '0' },
      'connect-timeout-s': { type: 'string', default: '10' },
      'dry-run': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!values.tenant) throw new UsageError('--tenant is required');
  const tags: Record<string, string> = {};
  for (const tag of values.tag ?? []) {
    const at = tag.indexOf('=');
    if (at <= 0) throw new UsageError(`--tag ${JSON.stringify(tag)}: write tags as KEY=VALUE`);
    tags[tag.slice(0, at)] = tag.slice(at + 1);
  }
  const options: Options = {
    tenant: values.tenant,
    sources: (values.source ?? []).map(normalizeSource),
    tags,
    force: values.force ?? false,
    batchSize: integer('--batch-size', values['batch-size']),
    question: values.question ?? '',
    imageUri: values['image-uri'] ?? '',
    topK: integer('--top-k', values['top-k']),
    mediaTypes: values['media-type'] ?? [],
    generate: !values['no-generate'],
    rerank: !values['no-rerank'],
    timeoutS: integer('--timeout-s', values['timeout-s']),
    connectTimeoutS: integer('--connect-timeout-s', values['connect-timeout-s']),
    dryRun: values['dry-run'] ?? false,
  };
  if (!options.sources.length && !options.question && !options.imageUri) {
    throw new UsageError('nothing to do: give --source, --question or --image-uri');
  }
  return options;
}

function integer(flag: string, value: string | undefined): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} ${value}: not a whole number`);
  return n;
}

/** Same rule as the Python CLI (activities/store/objects.py normalize_uri). */
function normalizeSource(pathOrUri: string): string {
  const scheme = /^([a-zA-Z][\w+.-]*):\/\//.exec(pathOrUri)?.[1];
  if (scheme === undefined) return pathToFileURL(resolve(pathOrUri)).href;
  if (scheme !== 'file' && scheme !== 'gs') {
    throw new UsageError(`unsupported URI scheme ${scheme} in ${pathOrUri}: use a path, file:// or gs://`);
  }
  return pathOrUri;
}

function ingestInput(o: Options): IngestBatchInput {
  const input: IngestBatchInput = { tenant: o.tenant, sources: o.sources, tags: o.tags, force: o.force };
  if (o.batchSize) input.batch_size = o.batchSize;
  return input;
}

function askInput(o: Options): AskInput {
  return {
    tenant: o.tenant,
    text: o.question,
    image_uri: o.imageUri,
    top_k: o.topK,
    filters: { media_types: o.mediaTypes },
    rerank: o.rerank,
    generate: o.generate,
  };
}

async function connect(connectTimeoutS: number): Promise<{ client: Client; where: string }> {
  const token = process.env[TOKEN_ENV] ?? '';
  if (!token) {
    throw new UsageError(
      `set ${TOKEN_ENV} to a credential for the tenant (\`mmrag token issue --tenant T --role writer\`): ` +
        'mmrag refuses workflow runs without one',
    );
  }
  const config = loadClientConnectConfig();
  // Drop unset keys so the client's own defaults apply (address localhost:7233).
  const options = Object.fromEntries(
    Object.entries(config.connectionOptions as Record<string, unknown>).filter(([, v]) => v !== undefined),
  ) as ConnectionOptions;
  const namespace = config.namespace ?? 'default';
  const where = `${options.address ?? 'localhost:7233'} (namespace ${namespace})`;
  // Payload encryption on: the same variables the `temporal` CLI reads for --codec-endpoint.
  const codecEndpoint = process.env.TEMPORAL_CODEC_ENDPOINT ?? '';
  const dataConverter = codecEndpoint
    ? { payloadCodecs: [new RemoteCodec(codecEndpoint, namespace, process.env.TEMPORAL_CODEC_AUTH ?? '')] }
    : undefined;
  try {
    const connection = await Connection.connect({ connectTimeout: `${connectTimeoutS || 10}s`, ...options });
    const interceptors = { workflow: [credentialInterceptor(token)] };
    return { client: new Client({ connection, namespace, dataConverter, interceptors }), where };
  } catch (e) {
    throw new UsageError(
      `cannot reach Temporal at ${where}: ${(e as Error).message}. ` +
        'Set TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE / TEMPORAL_API_KEY or a temporal.toml profile.',
    );
  }
}

/** Resolves with the promise, or rejects after `seconds` (0: never). */
async function within<T>(seconds: number, what: string, promise: Promise<T>): Promise<T> {
  if (!seconds) return promise;
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what} still running after ${seconds}s (it goes on; see the Web UI)`)),
      seconds * 1000,
    );
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function ingest(client: Client, o: Options): Promise<{ workflow_id: string; result: IngestResult }> {
  const input = ingestInput(o);
  const workflowId = batchWorkflowId(input);
  const handle = await client.workflow.start(INGEST_BATCH_WORKFLOW, {
    taskQueue: TASK_QUEUE,
    workflowId,
    args: [input],
    // Same ingest already running (from any language): wait for that one.
    workflowIdConflictPolicy: 'USE_EXISTING',
    staticSummary: `ingest ${input.sources.length} source(s) for tenant ${input.tenant} (TypeScript starter)`,
  });
  console.error(`started ${INGEST_BATCH_WORKFLOW} ${workflowId}`);
  const progress = setInterval(() => {
    handle
      .query<IngestProgress>('progress')
      .then((p) =>
        console.error(`  seen ${p.seen}  ingested ${p.ingested}  unchanged ${p.unchanged}  failed ${p.failed}`),
      )
      .catch(() => undefined); // between runs (continue-as-new) or already done
  }, 2000);
  try {
    const result = (await within(o.timeoutS, workflowId, handle.result())) as IngestResult;
    return { workflow_id: workflowId, result };
  } finally {
    clearInterval(progress);
  }
}

async function ask(client: Client, o: Options): Promise<{ workflow_id: string; result: AskResult }> {
  const input = askInput(o);
  const workflowId = `ask/${o.tenant}/${randomUUID().replaceAll('-', '')}`;
  const result = (await within(
    o.timeoutS,
    workflowId,
    client.workflow.execute(ASK_WORKFLOW, {
      taskQueue: TASK_QUEUE,
      workflowId,
      args: [input],
      staticSummary: `ask for tenant ${o.tenant} (TypeScript starter)`,
    }),
  )) as AskResult;
  return { workflow_id: workflowId, result };
}

async function main(argv: string[]): Promise<number> {
  const o = parseOptions(argv);
  const wantIngest = o.sources.length > 0;
  const wantAsk = Boolean(o.question || o.imageUri);
  if (o.dryRun) {
    const plan = {
      ingest: wantIngest ? { workflow_id: batchWorkflowId(ingestInput(o)), input: ingestInput(o) } : null,
      ask: wantAsk ? { input: askInput(o) } : null,
    };
    console.log(JSON.stringify(plan, null, 2));
    return 0;
  }
  const { client, where } = await connect(o.connectTimeoutS);
  console.error(`connected to ${where}`);
  const out: { ingest: unknown; ask: unknown } = { ingest: null, ask: null };
  let status = 0;
  try {
    if (wantIngest) {
      const done = await ingest(client, o);
      out.ingest = done;
      if (done.result.failed) status = 1;
    }
    if (wantAsk) out.ask = await ask(client, o);
  } finally {
    await client.connection.close();
  }
  console.log(JSON.stringify(out, null, 2));
  return status;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    if (e instanceof UsageError) {
      console.error(`error: ${e.message}`);
      if (e.message.startsWith('--') || e.message.startsWith('nothing')) console.error(USAGE);
      process.exit(2);
    }
    if (e instanceof WorkflowFailedError) {
      console.error(`error: ${e.message}: ${e.cause?.message ?? ''}`);
      process.exit(1);
    }
    if (e instanceof TypeError && (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`error: ${e.message}\n${USAGE}`);
      process.exit(2);
    }
    console.error(e);
    process.exit(1);
  },
);
