# BLIP-2 Studio container. CPU by default:
#   docker build -t blip2-studio .
#   docker run -p 7860:7860 -v hf-cache:/data/hf-cache blip2-studio
# GPU (CUDA wheels of the same torch release; run with --gpus all):
#   docker build -t blip2-studio:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# A different base (e.g. an NVIDIA CUDA runtime image with Python 3.11): --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Where torch comes from: the CPU-only wheels by default (a plain PyPI torch is a multi-GB CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HOME=/home/user \
    HF_HOME=/data/hf-cache \
    BLIP2_HOST=0.0.0.0 \
    BLIP2_PORT=7860

# Non-root user with uid 1000 (what Hugging Face Spaces expects), and a cache folder for the
# downloaded checkpoints that can be mounted as a volume so they survive the container.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin user \
    && mkdir -p /data/hf-cache \
    && chown -R user:user /data

WORKDIR /home/user/app

# Dependencies first: a code change does not reinstall them.
COPY --chown=1000:1000 requirements.txt ./
RUN pip install --extra-index-url "${TORCH_INDEX}" -r requirements.txt

COPY --chown=1000:1000 . .

USER 1000:1000
VOLUME ["/data/hf-cache"]
EXPOSE 7860

# The app's own readiness answer on BLIP2_PORT: 503 while the model loads, 200 once it serves
# (a real checkpoint takes minutes on first start: downloaded once, hence the long start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-m", "blip2_app.healthcheck"]

CMD ["python", "app.py"]
