"""Ray deployment: `python -m deploy.ray.launch` places the target's tensor-parallel ranks in one
placement group, draft workers on draft nodes and the orchestrator, each as an actor that runs the
service's own entry functions. `cluster.yaml` describes a cluster for `ray up`."""
