"""Queue-depth autoscaling: the policy, its hook into Ray Serve, and a trace simulator.

    policy.py         the policy as a pure function (ClusterLoad, PolicyState, now) -> ScalingDecision
    serve_policy.py   Serve's custom autoscaling policy around it, and the autoscaling_config to deploy it
    serve_default.py  Serve's default policy re-implemented for the simulator
    simulator.py      discrete-event simulation of a deployment under an autoscaler
    traces.py         steady, bursty, diurnal and file traces
    calibration.py    the replica cost model, measured on the real engine
    cli.py            `shardline capacity`
"""
