# syntax=docker/dockerfile:1.7
# vtfuse Serve image: the Ray Serve API (serving.app, import path serving.app.builder:build_app)
# on the pinned rayproject/ray image for Python 3.11, at the Ray version constraints.txt pins.
# KubeRay runs `ray start` in it (deploy/k8s/base/rayservice.yaml); alone, it runs
# `serve run` on deploy/serve_config.yaml (set VTFUSE_TRITON_URL to reach Triton).
#
#   docker build -f deploy/docker/serve.Dockerfile -t vtfuse/serve:0.1.0 .

# --- stage 1: wheels (files and pip's cache stay in this stage)
FROM rayproject/ray:2.60.0-py311-cpu AS wheels
WORKDIR /tmp/build
COPY constraints.txt deploy/docker/requirements-serve.txt ./
# No torch: the API decodes, tokenizes and calls Triton; the engines run in Triton.
RUN pip wheel --no-cache-dir --wheel-dir /tmp/wheels -c constraints.txt -r requirements-serve.txt

# --- stage 2: the runtime image
FROM rayproject/ray:2.60.0-py311-cpu
LABEL org.opencontainers.image.title="vtfuse-serve" \
      org.opencontainers.image.description="The vtfuse Ray Serve API (HTTP 8080, gRPC 9000)" \
      org.opencontainers.image.source="deploy/docker/serve.Dockerfile"
RUN --mount=type=bind,from=wheels,source=/tmp/wheels,target=/tmp/wheels \
    --mount=type=bind,source=deploy/docker/requirements-serve.txt,target=/tmp/requirements.txt \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir --no-index --find-links /tmp/wheels -c /tmp/constraints.txt -r /tmp/requirements.txt
WORKDIR /home/ray/vtfuse
COPY --chown=1000:100 serving/ serving/
COPY --chown=1000:100 deploy/serve_config.yaml deploy/serve_config.yaml
# The app reads config/tokenizer/answers from <repository>/fusion/<version>/checkpoint/;
# the engines themselves live in Triton.
COPY --chown=1000:100 checkpoints/tiny/config.json checkpoints/tiny/tokenizer.json checkpoints/tiny/answers.json \
     model_repository/fusion/1/checkpoint/
ENV PYTHONPATH=/home/ray/vtfuse \
    PYTHONDONTWRITEBYTECODE=1
# `ray` (uid 1000) ships with the image; numeric so runAsNonRoot can verify it.
USER 1000:100
EXPOSE 8080 9000 8265 6379 10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["ray", "health-check"]
CMD ["serve", "run", "deploy/serve_config.yaml"]
