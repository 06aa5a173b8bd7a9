# The sketchstream image behind docker-compose.yml's worker, refresh and topics services.
# Configured only through SKETCHSTREAM_* environment variables; `docker run IMAGE --help` lists
# the commands.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch's CPU wheels: the CUDA build from PyPI would add gigabytes a CPU container never uses.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY models ./models
COPY stream ./stream
COPY tools ./tools
RUN pip install --extra-index-url "$TORCH_INDEX" . \
    && useradd --create-home --uid 1000 sketchstream \
    && mkdir -p /var/lib/sketchstream/state /var/lib/sketchstream/artifacts \
                /var/lib/sketchstream/data \
    && chown -R sketchstream /var/lib/sketchstream

USER sketchstream
ENV SKETCHSTREAM_HOME=/var/lib/sketchstream \
    SKETCHSTREAM_STATE_DIR=/var/lib/sketchstream/state \
    SKETCHSTREAM_ARTIFACT_DIR=/var/lib/sketchstream/artifacts \
    SKETCHSTREAM_DATA_DIR=/var/lib/sketchstream/data
# numba's compiled kernels on the state volume: compiled once (tens of seconds), then loaded
# in about a second by every later start (the installed package's folder is not writable)
ENV NUMBA_CACHE_DIR=/var/lib/sketchstream/state/numba-cache
WORKDIR /var/lib/sketchstream
ENTRYPOINT ["sketchstream"]
CMD ["--help"]
