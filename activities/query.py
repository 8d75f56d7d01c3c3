"""The query worker's Ask step: encode the query and retrieve in one local activity.

On ``mmrag-query`` the CLIP model lives in the workflow's own worker (the query role), so
the query is not sent to the encode queue: it is encoded here and searched right away, one
SDK round trip for what costs two task-queue hops and two local activities elsewhere.
"""

from __future__ import annotations

import dataclasses

from activities.ask import AskActivities
from activities.encode_query import QueryEncodeActivities
from workflows.activities import ask as ask_stubs
from workflows.activities import implements
from workflows.activities.ask import (
    EncodeAndRetrieveInput,
    EncodedRetrieval,
    RetrieveAndAnswerInput,
)


class QueryActivities:
    def __init__(self, encode: QueryEncodeActivities, ask: AskActivities) -> None:
        self.encode = encode
        self.ask = ask

    @implements(ask_stubs.encode_and_retrieve)
    def encode_and_retrieve(self, inp: EncodeAndRetrieveInput) -> EncodedRetrieval:
        query = self.encode.encode_query(inp.encode)
        retrieve = dataclasses.replace(
            inp.retrieve,
            vector=query.vector,
            encoder_model=query.model,
            collection=query.collection,
            index_version=query.index_version,
        )
        query = dataclasses.replace(query, vector=[])
        if inp.answer:
            answered = self.ask.retrieve_and_answer(
                RetrieveAndAnswerInput(retrieve, inp.elapsed_ms + query.ms)
            )
            return EncodedRetrieval(query, answered=answered)
        return EncodedRetrieval(query, retrieval=self.ask.retrieve(retrieve))
