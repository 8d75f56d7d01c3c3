#!/usr/bin/env bash
# Execute mmrag's Ask workflow with the `temporal` CLI and print its result as JSON.
#
#   starters/shell/ask.sh --tenant acme [--top-k N] [--image-uri URI] [--media-type TYPE]...
#       [--filter-tag K=V]... [--no-generate] [--no-rerank] QUESTION
#
# Prints the Ask result contract (answer, sources, latency_ms, answer_kind, ...).
# Connection: whatever the `temporal` CLI reads: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
# TEMPORAL_API_KEY, TEMPORAL_TLS_*, TEMPORAL_CODEC_ENDPOINT (payload encryption on), or a
# temporal.toml profile (TEMPORAL_PROFILE). Needs `temporal` (or $TEMPORAL_CLI) and `jq`.
# Credential: MMRAG_AUTH_TOKEN (`mmrag token issue --tenant T --role reader`), sent in the
# `mmrag_auth` workflow header; mmrag's workers refuse runs without a valid one.
# Exit status: 0 answered, 1 the workflow failed, 2 usage.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }
# The result payload exactly as the worker wrote it (the CLI's JSON shorthand turns [] into null).
result_json='.result | (.metadata.encoding // "" | @base64d) as $enc
  | if $enc == "json/plain" then .data | @base64d | fromjson
    else error("the result is \($enc): set TEMPORAL_CODEC_ENDPOINT to decode it") end'
command -v jq >/dev/null || die "jq is not on PATH"

tenant="" top_k=5 image_uri="" generate=true rerank=true tags='{}' media_types='[]' question=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tenant) tenant=${2:?--tenant needs a value}; shift 2 ;;
    --top-k) top_k=${2:?--top-k needs a value}; shift 2 ;;
    --image-uri) image_uri=${2:?--image-uri needs a value}; shift 2 ;;
    --media-type)
      media_types=$(jq -c --arg m "${2:?--media-type needs a value}" '. + [$m]' <<<"$media_types")
      shift 2 ;;
    --filter-tag)
      [[ "${2:-}" == ?*=* ]] || die "--filter-tag ${2:-}: write tags as KEY=VALUE"
      tags=$(jq -c --arg k "${2%%=*}" --arg v "${2#*=}" '. + {($k): $v}' <<<"$tags"); shift 2 ;;
    --no-generate) generate=false; shift ;;
    --no-rerank) rerank=false; shift ;;
    -h|--help) usage ;;
    --) shift; question="$*"; break ;;
    -*) die "unknown option $1" ;;
    *) question="${question:+$question }$1"; shift ;;
  esac
done
[ -n "$tenant" ] || die "--tenant is required"
[ -n "$question" ] || [ -n "$image_uri" ] || die "give a QUESTION, --image-uri or both"
[[ "$top_k" =~ ^[0-9]+$ ]] || die "--top-k $top_k: not a whole number"

temporal=${TEMPORAL_CLI:-temporal}
command -v "$temporal" >/dev/null || die "the temporal CLI is not on PATH (set TEMPORAL_CLI)"
[ -n "${MMRAG_AUTH_TOKEN:-}" ] ||
  die "set MMRAG_AUTH_TOKEN to a credential for tenant $tenant (mmrag token issue --tenant $tenant --role reader)"
# The header value is JSON: the token as a JSON string.
auth_header="mmrag_auth=$(jq -n -c --arg t "$MMRAG_AUTH_TOKEN" '$t')"

input=$(jq -n -c \
  --arg tenant "$tenant" --arg text "$question" --arg image_uri "$image_uri" \
  --argjson top_k "$top_k" --argjson generate "$generate" --argjson rerank "$rerank" \
  --argjson tags "$tags" --argjson media_types "$media_types" \
  '{tenant: $tenant, text: $text, image_uri: $image_uri, top_k: $top_k,
    filters: {tags: $tags, media_types: $media_types}, rerank: $rerank, generate: $generate}')
workflow_id="ask/$tenant/sh-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

if ! out=$("$temporal" workflow execute \
  --type Ask --task-queue mmrag --workflow-id "$workflow_id" \
  --static-summary "ask for tenant $tenant (shell starter)" \
  --input "$input" --headers "$auth_header" --output json --no-json-shorthand-payloads); then
  echo "$out" >&2
  exit 1
fi
jq "$result_json" <<<"$out"
