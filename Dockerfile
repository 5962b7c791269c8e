# One image for both services and for the migrations; the command picks which.
# Build stage: the locked dependencies into a virtualenv, then the project's wheel (protos
# compiled by its build step). Runtime stage: that virtualenv and the migrations, nothing else.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from the locks alone: these layers are rebuilt only when a lock changes.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/blumpo \
 && /opt/blumpo/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes -r requirements-build.lock
COPY pyproject.toml setup.py MANIFEST.in ./
COPY protos/ protos/
COPY third_party/ third_party/
COPY blumpo_common/ blumpo_common/
COPY token_service/ token_service/
COPY generation_service/ generation_service/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels . \
 && /opt/blumpo/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

FROM python:3.11-slim
ENV PATH=/opt/blumpo/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/blumpo /opt/blumpo
WORKDIR /app
COPY db/migrations/ db/migrations/
# A numeric user, so a runtime that forbids root can tell it is not root without a passwd entry.
USER 10001:10001
EXPOSE 50051 50052 9151 9152
# The token service's port; compose checks each service at its own (blumpo-healthcheck HOST:PORT).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["blumpo-healthcheck"]
CMD ["blumpo-token-service"]
