# jobq: the CLI, the worker runtime, the bundled document workers (dataflow, raptor) and the migrations.
# Used by compose.yaml for the migrate, worker and exporter services.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first: a source change does not reinstall them.
COPY pyproject.toml README.md* ./
COPY jobqueue ./jobqueue
COPY migrations ./migrations
COPY workers ./workers
RUN pip install ".[documents]"

# Workers never need root; a fixed uid lets a volume's files be owned predictably.
RUN useradd --system --uid 10001 --home-dir /var/lib/jobq --create-home jobq
USER jobq

ENTRYPOINT ["jobq"]
CMD ["--help"]
