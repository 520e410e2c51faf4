"""Deployment assets (images, Kubernetes, Prometheus) and the tools that check them: `python -m deploy.check`."""
