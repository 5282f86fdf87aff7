"""Ray Serve: the OpenAI-compatible HTTP API over model replicas.

    config.py      ServeConfig: the one validated config of a served model
    protocol.py    strict pydantic request bodies; errors.py: OpenAI error bodies
    ingress.py     the FastAPI app and its size/drain guard; service.py: the endpoints' logic
    router.py      ReplicaRouter: the one place a request's replica is chosen
    replica.py     ModelReplica: engine, validation, admission (admission.py), deltas (events.py)
    app.py         the Serve deployments and build_app(config); server.py, cli.py: `shardline serve|status`

Everything but app.py, router.py, server.py and status.py's fetch is plain Python without Ray.
"""
