"""The deployment generators (`farm deploy`) and, beside them, the container images.

    files.py       what every target shares: the spec, a class's queues, env, grace, writer
    compose.py     docker compose: Redis, MinIO, a worker per class, Prometheus, Grafana
    k8s.py         Kubernetes: a Deployment and a KEDA ScaledObject per class
    skypilot.py    SkyPilot: a spot task per class, on any cloud
    access.py      least privilege: the S3 policies and Redis ACLs
    gpus.py        which GPUs fall in which class; a class needs cards of its own
    monitoring.py  the metrics exporter, scrape configuration, alert rules, dashboard
"""
