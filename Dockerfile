# lacy-stream on a CUDA PyTorch image (torch comes from the base image and is not reinstalled).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/lacy-stream
COPY pyproject.toml README.md ./
COPY lacy_stream ./lacy_stream
COPY scripts ./scripts
RUN pip install ".[demo,hf,eval]"

WORKDIR /workspace
ENTRYPOINT ["lacy-stream"]
CMD ["--help"]
