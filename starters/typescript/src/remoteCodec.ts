import type { Payload, PayloadCodec } from '@temporalio/common';

/** A payload as Temporal's remote codec protocol carries it: bytes as base64. */
interface JsonPayload {
  metadata?: Record<string, string>;
  data?: string;
}

const toBase64 = (bytes: Uint8Array): string => Buffer.from(bytes).toString('base64');
const fromBase64 = (text: string): Uint8Array => new Uint8Array(Buffer.from(text, 'base64'));

/**
 * Payload encryption through a codec server (`mmrag codec-server`), the way the Web UI and
 * `temporal --codec-endpoint` use it: `POST <endpoint>/encode|decode` with
 * `{"payloads": [...]}`, `X-Namespace` and an optional `Authorization` header. The key stays
 * in the codec server; this process only ever holds plaintext it sent or asked for.
 */
export class RemoteCodec implements PayloadCodec {
  constructor(
    private readonly endpoint: string,
    private readonly namespace: string,
    private readonly authorization = '',
  ) {}

  encode(payloads: Payload[]): Promise<Payload[]> {
    return this.call('encode', payloads);
  }

  decode(payloads: Payload[]): Promise<Payload[]> {
    return this.call('decode', payloads);
  }

  private async call(route: 'encode' | 'decode', payloads: Payload[]): Promise<Payload[]> {
    if (!payloads.length) return payloads;
    const body: { payloads: JsonPayload[] } = {
      payloads: payloads.map((p) => ({
        metadata: Object.fromEntries(Object.entries(p.metadata ?? {}).map(([k, v]) => [k, toBase64(v)])),
        data: toBase64(p.data ?? new Uint8Array()),
      })),
    };
    const headers: Record<string, string> = { 'Content-Type': 'application/json', 'X-Namespace': this.namespace };
    if (this.authorization) headers.Authorization = this.authorization;
    const url = `${this.endpoint.replace(/\/+$/, '')}/${route}`;
    let response: Response;
    try {
      response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(body) });
    } catch (e) {
      throw new Error(`codec server ${url} unreachable: ${(e as Error).message}`);
    }
    if (!response.ok) {
      throw new Error(`codec server ${url}: HTTP ${response.status} ${(await response.text()).trim()}`);
    }
    const answer = (await response.json()) as { payloads?: JsonPayload[] };
    if (answer.payloads?.length !== payloads.length) {
      throw new Error(`codec server ${url}: expected ${payloads.length} payloads back`);
    }
    return answer.payloads.map((p) => ({
      metadata: Object.fromEntries(Object.entries(p.metadata ?? {}).map(([k, v]) => [k, fromBase64(v)])),
      data: fromBase64(p.data ?? ''),
    }));
  }
}
