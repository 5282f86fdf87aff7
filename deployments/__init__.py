"""Ray Serve: the OpenAI-compatible HTTP API over model replicas.

    config.py      ServeConfig: the one validated config of a served model
    protocol.py    strict pydantic request bodies; errors.py: OpenAI error bodies
    ingress.py     the FastAPI app and its size/drain guard; service.py: the endpoints' logic
    router.py      ReplicaRouter: the one place a request's replica is chosen (asks the scheduler)
    scheduling.py  the line to the app's head-node scheduler actor, failing fast (fallback)
    serve_router.py Serve's request router: delivers a request to the scheduler's replica
    replica.py     ModelReplica: engine, validation, admission (admission.py), deltas (events.py)
    reporter.py    a replica's load and KV events to the scheduler, resync on gaps
    app.py         the Serve deployments and build_app(config); server.py, cli.py: `shardline serve|status`

Everything but app.py, router.py, scheduling.py, serve_router.py, server.py and status.py's
fetch is plain Python without Ray.
"""
