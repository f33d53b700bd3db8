"""Routing requests to the model replicas that already hold their LoRAs, with Ray Serve's model multiplexing.

The multiplexed model id of a request is its *adapter set id*: the names of its LoRAs with a weight other than 0
(the `loras` field and `<lora:name:w>` tags alike), sorted and joined with "|" ("" without LoRAs: ordinary
routing). Weights are not part of it: they change no file that must be resident. The model deployment loads the set
through `@serve.multiplexed` (serving/model_server.py: prefetch into its host cache) and reports it to Serve's
router, which then sends requests with the same id to replicas that report it, and a new id to the replicas with
the fewest sets (so a catalogue spreads over replicas instead of every replica loading everything).

Why an adapter-set id and not Serve's custom RequestRouter: multiplexing is Serve's own mechanism (routing table,
LRU per replica, fallback after RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S when the holders are busy); a
request with one LoRA (the common case) gets exactly its name as id. Requests with several LoRAs are routed by the
whole set: two sets sharing a LoRA may land apart (the host cache then loads it twice, once per replica).

From HTTP the ingress derives the id from the body; a client may also send the header
`serve_multiplexed_model_id` (it wins, e.g. to pin a family of requests together). From a handle:
`handle.options(multiplexed_model_id=adapter_set_id(request)).generate.remote(request)`.
"""
from __future__ import annotations

from core.prompt_syntax import extract_loras
from core.schemas import GenerationRequest

SEPARATOR = "|"


def adapter_set_id(req: GenerationRequest) -> str:
    names = {r.name for r in req.loras if r.weight != 0}
    try:
        _, tags = extract_loras(req.prompt)
    except ValueError:  # the engine reports the bad tag; routing just ignores it
        tags = []
    names |= {name for name, weight in tags if weight != 0}
    return SEPARATOR.join(sorted(names))


def adapter_names(set_id: str) -> list[str]:
    return [n for n in set_id.split(SEPARATOR) if n]


def routed(handle, req: GenerationRequest):
    """`handle` with the request's multiplexed model id: the caller's `serve_multiplexed_model_id` header when it
    sent one, else the adapter set id (unchanged handle without LoRAs)."""
    from ray import serve

    try:
        given = serve.get_multiplexed_model_id()
    except Exception:  # noqa: BLE001 - outside a replica (tests, scripts): no request context
        given = ""
    set_id = given or adapter_set_id(req)
    return handle.options(multiplexed_model_id=set_id) if set_id else handle
