"""The wheel carries the gRPC modules generated from protos/ (package `blumpo`): build_py runs
grpc_tools.protoc (a build requirement) into the build folder. An editable install leaves them
to `make proto`, which also writes their type stubs into the source tree."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(str(p) for p in Path("protos").rglob("*.proto"))
        included = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = [
            "grpc_tools.protoc",
            "-Iprotos",
            "-Ithird_party/googleapis",
            f"-I{included}",
            f"--python_out={self.build_lib}",
            f"--grpc_python_out={self.build_lib}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on protos/")


setup(cmdclass={"build_py": BuildWithProtos})
