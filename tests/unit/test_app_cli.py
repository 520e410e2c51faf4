"""`vtfuse serve`: the Serve config it deploys (ports, Triton address, preset) and its flags/environment."""

from __future__ import annotations

import argparse

import pytest
from ray.serve.schema import ServeDeploySchema

from serving.app import cli as app_cli
from serving.app.settings import AppArgs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    app_cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_defaults_are_the_spec_ports(monkeypatch):
    for var in ("API_PORT", "GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT", "PRESET"):
        monkeypatch.delenv(var, raising=False)
    ns = parse([])
    assert (ns.api_host, ns.api_port, ns.grpc_port) == ("127.0.0.1", 8080, 9000)
    assert (ns.triton_http_port, ns.triton_grpc_port, ns.triton_metrics_port) == (8000, 8001, 8002)


def test_environment_overrides_ports(monkeypatch):
    monkeypatch.setenv("API_PORT", "18080")
    monkeypatch.setenv("GRPC_PORT", "19000")
    monkeypatch.setenv("TRITON_GRPC_PORT", "18001")
    ns = parse([])
    assert (ns.api_port, ns.grpc_port, ns.triton_grpc_port) == (18080, 19000, 18001)
    assert parse(["--api-port", "7000"]).api_port == 7000  # a flag wins over the environment


def test_ray_cpus_are_whole_numbers_checked_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setenv("RAY_NUM_CPUS", "3")
    assert parse([]).num_cpus == 3  # an int: `ray start --num-cpus` takes nothing else
    assert parse(["--num-cpus", "1"]).num_cpus == 1
    for argv, env in ((["--num-cpus", "1.5"], "2"), ([], "1.5")):  # a usage error, not Ray's exit code 2 later
        monkeypatch.setenv("RAY_NUM_CPUS", env)
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2 and "argument --num-cpus: invalid int value: '1.5'" in capsys.readouterr().err


def test_rendered_config_is_a_valid_serve_config(monkeypatch, tmp_path):
    monkeypatch.delenv("PRESET", raising=False)
    ns = parse(["--api-port", "18080", "--grpc-port", "19000", "--repository", str(tmp_path)])
    cfg = app_cli.render_serve_config(app_cli.load_serve_config(app_cli.DEFAULT_CONFIG), ns, "127.0.0.1:18001")
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.port == 18080 and schema.grpc_options.port == 19000
    assert schema.grpc_options.grpc_servicer_functions == [
        "serving.proto.vtfuse_pb2_grpc.add_VtfuseServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
    (app,) = schema.applications
    args = AppArgs.model_validate(app.args)
    assert args.triton_url == "127.0.0.1:18001" and args.repository == str(tmp_path.resolve())


def test_preset_and_inline_preprocessing(monkeypatch):
    monkeypatch.setenv("PRESET", "small")
    config = app_cli.load_serve_config(app_cli.DEFAULT_CONFIG)
    config["applications"][0]["args"]["preprocess"] = "inline"
    config["applications"][0]["deployments"].append({"name": "Preprocess", "num_replicas": 2})
    cfg = app_cli.render_serve_config(config, parse([]), "127.0.0.1:8001")
    (app,) = cfg["applications"]
    assert app["args"]["default_model"] == "small" and list(app["args"]["models"]) == ["small"]
    assert [d["name"] for d in app["deployments"]] == ["Ingress"]  # no Preprocess deployment to configure


def test_a_config_without_applications_is_refused(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("http_options: {port: 1}\n")
    with pytest.raises(SystemExit, match="no `applications:`"):
        app_cli.load_serve_config(bad)


def test_log_encoding_and_tracing_reach_the_serve_config(monkeypatch, tmp_path):
    monkeypatch.delenv("PRESET", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    config = app_cli.load_serve_config(app_cli.DEFAULT_CONFIG)
    plain = ServeDeploySchema.model_validate(app_cli.render_serve_config(config, parse([]), "127.0.0.1:8001"))
    assert plain.tracing_config is None  # no OTLP endpoint: tracing off
    assert plain.applications[0].logging_config.encoding == "TEXT"
    assert plain.applications[0].logging_config.additional_log_standard_attrs == ["name"]

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    cfg = app_cli.render_serve_config(config, parse(["--log-encoding", "json"]), "127.0.0.1:8001")
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.applications[0].logging_config.encoding == "JSON" and schema.logging_config.encoding == "JSON"
    assert schema.tracing_config.enabled and schema.tracing_config.sampling_ratio == 0.25
    assert schema.tracing_config.exporter_import_path == "serving.tracing:otlp_span_processors"
