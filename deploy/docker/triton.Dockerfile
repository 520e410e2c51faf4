# syntax=docker/dockerfile:1.7
# vtfuse Triton image: NGC tritonserver 24.10 (Triton 2.51, the release of the embedded server;
# TensorRT 10.5, Python 3.10) plus the `serving` package that the Python-backend models
# (preprocess, vqa) import; no torch. No engines are baked in: in Kubernetes /models comes from
# the trt-plans Job's volume (gpu) or the export init container (cpu); elsewhere mount a
# repository at /models.
#
#   docker build -f deploy/docker/triton.Dockerfile -t vtfuse/triton:0.1.0 .

# --- stage 1: wheels of what the Python models import. Wheel files and pip's cache stay in this stage.
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS wheels
WORKDIR /build
COPY constraints.txt deploy/docker/requirements-triton.txt ./
# No torch: the engines run in Triton's onnxruntime or tensorrt backend (triton-torch.Dockerfile
# is the image with torch, for the `torch` target).
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt -r requirements-triton.txt

# --- stage 2: the runtime image
FROM nvcr.io/nvidia/tritonserver:24.10-py3
LABEL org.opencontainers.image.title="vtfuse-triton" \
      org.opencontainers.image.description="Triton 2.51 (NGC 24.10) with the vtfuse Python-backend models' package" \
      org.opencontainers.image.source="deploy/docker/triton.Dockerfile"
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/docker/requirements-triton.txt,target=/tmp/requirements.txt \
    pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.txt
COPY --chown=root:root serving/ /opt/vtfuse/serving/
# The gpu overlay's init container: waits for and verifies the plans of the pod's GPU type.
COPY --chown=root:root deploy/docker/verify-plans.py /opt/vtfuse/bin/verify-plans.py
# The Python-backend stubs inherit this environment: `serving` importable, one BLAS thread each.
ENV PYTHONPATH=/opt/vtfuse \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1
# triton-server (uid 1000) ships with the NGC image; numeric so runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# Production flags; Kubernetes passes its own (deploy/k8s/base/triton-deployment.yaml).
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true", \
     "--exit-timeout-secs=30", "--allow-metrics=true", "--allow-cpu-metrics=true", \
     "--metrics-config=summary_latencies=true"]
