# syntax=docker/dockerfile:1.7
# vtfuse Triton image for the `torch` target (overlays/gpu-torch): NGC tritonserver 24.10 (Triton
# 2.51, Python 3.10), the `serving` package, and CUDA torch in the Python backend's environment:
# the Python-backend models of `vtfuse export all --target torch` run the PyTorch engines on the
# pod's GPU under FP16 autocast. torch from PyPI is the CUDA build and brings its own CUDA
# runtime libraries; the node's driver must support that CUDA (deploy/README.md).
#
#   docker build -f deploy/docker/triton-torch.Dockerfile -t vtfuse/triton-torch:0.1.0 .

# --- stage 1: wheels (files and pip's cache stay in this stage)
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS wheels
WORKDIR /build
COPY constraints.txt deploy/docker/requirements-triton.txt deploy/docker/requirements-triton-torch.txt ./
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt -r requirements-triton-torch.txt

# --- stage 2: the runtime image
FROM nvcr.io/nvidia/tritonserver:24.10-py3
LABEL org.opencontainers.image.title="vtfuse-triton-torch" \
      org.opencontainers.image.description="Triton 2.51 (NGC 24.10) with CUDA torch for the vtfuse torch target" \
      org.opencontainers.image.source="deploy/docker/triton-torch.Dockerfile"
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/docker/requirements-triton.txt,target=/tmp/requirements-triton.txt \
    --mount=type=bind,source=deploy/docker/requirements-triton-torch.txt,target=/tmp/requirements-triton-torch.txt \
    pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements-triton-torch.txt
# Imported checkpoints (`import-hf --target torch`) run their family's PyTorch modules, which are part of
# the runtime package too (serving/families/modules/).
COPY --chown=root:root serving/ /opt/vtfuse/serving/
# The Python-backend stubs inherit this environment: `serving` importable, one BLAS thread each.
ENV PYTHONPATH=/opt/vtfuse \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1
# triton-server (uid 1000) ships with the NGC image; numeric so runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true", \
     "--exit-timeout-secs=30", "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=true", \
     "--metrics-config=summary_latencies=true"]
