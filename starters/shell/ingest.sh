#!/usr/bin/env bash
# Start mmrag's IngestBatch workflow with the `temporal` CLI and print its result as JSON.
#
#   starters/shell/ingest.sh --tenant acme [--tag K=V]... [--force] [--batch-size N] \
#       [--workflow-id ID] SOURCE...
#
# SOURCE: a file:// or gs:// URI, or a path (made absolute here; the workers must see it).
# Connection: whatever the `temporal` CLI reads: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
# TEMPORAL_API_KEY, TEMPORAL_TLS_*, TEMPORAL_CODEC_ENDPOINT (payload encryption on), or a
# temporal.toml profile (TEMPORAL_PROFILE). Needs `temporal` (or $TEMPORAL_CLI) and `jq`.
# Credential: MMRAG_AUTH_TOKEN (`mmrag token issue --tenant T --role writer`), sent in the
# `mmrag_auth` workflow header; mmrag's workers refuse runs without a valid one.
# Exit status: 0 all ingested or unchanged, 1 some objects failed or the workflow failed,
# 2 usage.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }
# The result payload exactly as the worker wrote it (the CLI's JSON shorthand turns [] into null).
result_json='.result | (.metadata.encoding // "" | @base64d) as $enc
  | if $enc == "json/plain" then .data | @base64d | fromjson
    else error("the result is \($enc): set TEMPORAL_CODEC_ENDPOINT to decode it") end'
command -v jq >/dev/null || die "jq is not on PATH"

tenant="" force=false batch_size=0 workflow_id="" tags='{}' sources=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tenant) tenant=${2:?--tenant needs a value}; shift 2 ;;
    --tag)
      [[ "${2:-}" == ?*=* ]] || die "--tag ${2:-}: write tags as KEY=VALUE"
      tags=$(jq -c --arg k "${2%%=*}" --arg v "${2#*=}" '. + {($k): $v}' <<<"$tags"); shift 2 ;;
    --force) force=true; shift ;;
    --batch-size) batch_size=${2:?--batch-size needs a value}; shift 2 ;;
    --workflow-id) workflow_id=${2:?--workflow-id needs a value}; shift 2 ;;
    -h|--help) usage ;;
    --) shift; sources+=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) sources+=("$1"); shift ;;
  esac
done
[ -n "$tenant" ] || die "--tenant is required"
[ ${#sources[@]} -gt 0 ] || die "give at least one SOURCE"
[[ "$batch_size" =~ ^[0-9]+$ ]] || die "--batch-size $batch_size: not a whole number"

temporal=${TEMPORAL_CLI:-temporal}
command -v "$temporal" >/dev/null || die "the temporal CLI is not on PATH (set TEMPORAL_CLI)"

uris=()
for source in "${sources[@]}"; do
  case "$source" in
    file://*|gs://*) uris+=("$source") ;;
    *://*) die "unsupported URI $source: use a path, file:// or gs://" ;;
    /*) uris+=("$source") ;;
    *) uris+=("$PWD/$source") ;;
  esac
done

[ -n "${MMRAG_AUTH_TOKEN:-}" ] ||
  die "set MMRAG_AUTH_TOKEN to a credential for tenant $tenant (mmrag token issue --tenant $tenant --role writer)"
# The header value is JSON: the token as a JSON string.
auth_header="mmrag_auth=$(jq -n -c --arg t "$MMRAG_AUTH_TOKEN" '$t')"

input=$(jq -n -c \
  --arg tenant "$tenant" \
  --argjson tags "$tags" \
  --argjson force "$force" \
  --argjson batch_size "$batch_size" \
  '{tenant: $tenant, sources: $ARGS.positional, tags: $tags, force: $force, batch_size: $batch_size}' \
  --args "${uris[@]}")
if [ -z "$workflow_id" ]; then
  # Stable per (sources, tags, force): running the same ingest again attaches to it.
  sha256() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
  digest=$(jq -c '[.sources, .tags, .force]' <<<"$input" | sha256 | cut -c1-16)
  workflow_id="ingest-batch/$tenant/sh-$digest"
fi

echo "starting IngestBatch $workflow_id" >&2
if ! out=$("$temporal" workflow execute \
  --type IngestBatch --task-queue mmrag --workflow-id "$workflow_id" \
  --id-conflict-policy UseExisting \
  --static-summary "ingest ${#uris[@]} source(s) for tenant $tenant (shell starter)" \
  --input "$input" --headers "$auth_header" --output json --no-json-shorthand-payloads); then
  echo "$out" >&2
  exit 1
fi
result=$(jq "$result_json" <<<"$out")
echo "$result"
[ "$(jq '.failed' <<<"$result")" = 0 ]
