/**
 * mmrag's workflow credential: every run mmrag starts must carry a signed token in the
 * Temporal workflow header `mmrag_auth` (tenants, role, expiry, key id). Workers refuse runs
 * without a valid one, non-retryably, with a line that says what to fix.
 *
 * The token is issued by whoever holds mmrag's signing key (`mmrag token issue --tenant T
 * --role writer --ttl 15m`, or your own API gateway) and reaches this process in
 * MMRAG_AUTH_TOKEN. It is sent as a JSON string, exactly as
 * `temporal workflow start --headers 'mmrag_auth="<token>"'` sends it.
 */
import type { WorkflowClientInterceptor } from '@temporalio/client';
import { defaultPayloadConverter } from '@temporalio/common';

export const AUTH_HEADER = 'mmrag_auth';
export const TOKEN_ENV = 'MMRAG_AUTH_TOKEN';

/** Adds the credential to every workflow start, signal-with-start included. */
export function credentialInterceptor(token: string): WorkflowClientInterceptor {
  const header = defaultPayloadConverter.toPayload(token);
  return {
    async startWithDetails(input, next) {
      return next({ ...input, headers: { ...input.headers, [AUTH_HEADER]: header } });
    },
    async signalWithStart(input, next) {
      return next({ ...input, headers: { ...input.headers, [AUTH_HEADER]: header } });
    },
  };
}
