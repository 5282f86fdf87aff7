"""The head node's control plane: global queue, exact KV index, placement, tenants.

    kv_index.py        which replica holds which prefix block (the engine's own hashes)
    placement.py       ReplicaLoad, RouteRequest and the policies: round_robin, pow2,
                       prefix_approx, kv_aware (default)
    global_queue.py    late binding, weighted fair share over tenants, priorities, 429s
    tenants.py         tenant records (API key, weight, limits, cache salt, prices), usage ledger
    scheduler.py       the plain-Python core that holds them all (clock passed in)
    async_scheduler.py `await place(request)` over the core, asyncio only
    scheduler_actor.py the Ray actor (the only module here that imports ray)

The scheduler modules never import engine: the ingress hashes prompts with the engine's function
and passes the hashes in.
"""
