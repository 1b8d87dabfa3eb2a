# lacy-stream with the torch release CI tests (2.13.0). Its PyPI build for Linux is the CUDA 13.0 one (the
# host needs an NVIDIA driver >= 580) and brings triton 3.7.1; triton compiles its kernel launchers with the
# image's C compiler, which the full (non-slim) Python image has.
FROM python:3.11-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN pip install torch==2.13.0

WORKDIR /opt/lacy-stream
COPY pyproject.toml README.md ./
COPY lacy_stream ./lacy_stream
COPY scripts ./scripts
RUN pip install ".[demo,hf,eval,tracking]"

WORKDIR /workspace
ENTRYPOINT ["lacy-stream"]
CMD ["--help"]
