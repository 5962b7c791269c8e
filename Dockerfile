# One image for both services and for migrations; the command picks which.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
COPY blumpo_common/ blumpo_common/
COPY token_service/ token_service/
COPY generation_service/ generation_service/
COPY protos/ protos/
COPY third_party/ third_party/
COPY db/ db/
RUN pip install --no-cache-dir . \
 && python -m grpc_tools.protoc -I protos -I third_party/googleapis \
      --python_out=. --grpc_python_out=. $(find protos -name '*.proto')
USER nobody
CMD ["python", "-m", "token_service"]
