# syntax=docker/dockerfile:1.7
# vtfuse export image: runs as the Triton pod's init container and renders /models for the node
# it lands on. TensorRT plans are only valid on the GPU model and TensorRT version that built
# them, so stage 3 (engine) runs there, on the pod's GPU; stages 1-2 (ONNX export, ONNX Runtime
# vs PyTorch parity) run once, here, at image build. The base is the NGC TensorRT image of the
# same release as the tritonserver image (24.10: TensorRT 10.5), so plans and server agree.
# With VTFUSE_IMPORT_HF="NAME=SOURCE ..." the entrypoint then imports those Hugging Face
# checkpoints (`vtfuse import-hf`, folders mounted into the container) next to the native engines.
#
#   docker build -f deploy/docker/export.Dockerfile -t vtfuse/export:0.1.0 .

# --- stage 1: wheels (files and pip's cache stay in this stage)
FROM nvcr.io/nvidia/tensorrt:24.10-py3 AS wheels
WORKDIR /build
COPY constraints.txt deploy/docker/requirements-export.txt ./
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu torch \
 && pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt --find-links /wheels \
        -r requirements-export.txt

# --- stage 2: the runtime: dependencies, sources, the committed repository and the checkpoint
FROM nvcr.io/nvidia/tensorrt:24.10-py3 AS runtime
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/docker/requirements-export.txt,target=/tmp/requirements.txt \
    pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.txt \
 && groupadd --gid 1000 vtfuse && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin vtfuse
WORKDIR /opt/vtfuse
COPY serving/ serving/
COPY export/ export/
COPY model_repository/ model_repository/
COPY checkpoints/tiny/ checkpoints/tiny/
COPY deploy/docker/export-entrypoint.sh /usr/local/bin/vtfuse-export
ENV PYTHONPATH=/opt/vtfuse \
    PYTHONDONTWRITEBYTECODE=1

# --- stage 3: stages 1-2 of the export, on CPU (deterministic); only their output is kept
FROM runtime AS onnx
RUN python -m serving.cli export onnx --checkpoint tiny \
 && python -m serving.cli export check --checkpoint tiny

# --- stage 4: the image
FROM runtime
LABEL org.opencontainers.image.title="vtfuse-export" \
      org.opencontainers.image.description="Renders a Triton model repository (TensorRT plans or ONNX) for the node's GPU" \
      org.opencontainers.image.source="deploy/docker/export.Dockerfile"
COPY --from=onnx /opt/vtfuse/build/onnx/ /opt/vtfuse/build/onnx/
USER 1000:1000
# A run-to-completion init container: nothing to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/vtfuse-export"]
