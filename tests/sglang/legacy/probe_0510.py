"""Run inside the SGLang 0.5.10 venv (tests/legacy/test_sglang_0510.py); prints one JSON object.

    probe_0510.py server-args MODEL_DIR   SGLang's own parser on good and bad --modelexpress-config
    probe_0510.py loader                  the patched loader's dispatch, with sglang_legacy.load_model stubbed
"""

import argparse
import json
import sys


def server_args(model_dir: str) -> dict:
    from sglang.srt.server_args import ServerArgs

    def build(*extra: str):
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(["--model-path", model_dir, "--device", "cpu", *extra])
        return ServerArgs.from_cli_args(args)

    out = {}
    target = build("--load-format", "remote_instance", "--remote-instance-weight-loader-backend", "modelexpress",
                   "--modelexpress-config", '{"url": "127.0.0.1:9", "wait_timeout_s": 5}')
    out["target"] = {"load_format": str(target.load_format), "url": target.modelexpress_url,
                     "source": target.modelexpress_source,
                     "transfer_engine": target.remote_instance_weight_loader_use_transfer_engine()}
    seed = build("--modelexpress-config", '{"url": "127.0.0.1:9", "source": true}')
    out["seed"] = {"load_format": str(seed.load_format), "source": seed.modelexpress_source,
                   "transfer_engine": seed.remote_instance_weight_loader_use_transfer_engine()}
    for name, raw in (("bad_key", '{"url": "127.0.0.1:9", "bogus": 1}'), ("bad_value", '{"fallback": "maybe"}')):
        try:
            build("--load-format", "remote_instance", "--remote-instance-weight-loader-backend", "modelexpress",
                  "--modelexpress-config", raw)
            out[name] = None
        except Exception as e:  # reported to the test, which pins type and message
            out[name] = {"type": type(e).__name__, "module": type(e).__module__, "message": str(e)}
    return out


def loader() -> dict:
    import sglang_mx.sglang.legacy as legacy

    calls = []

    def stub_load_model(loader, *, model_config, device_config):  # records the dispatch, loads nothing
        calls.append({"loader": type(loader).__name__, "model_config": model_config, "device_config": device_config,
                      "backend": str(loader.load_config.remote_instance_weight_loader_backend)})
        return "model from sglang_mx"

    legacy.load_model = stub_load_model
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import get_model_loader

    mx = get_model_loader(LoadConfig(load_format="remote_instance", remote_instance_weight_loader_backend="modelexpress"))
    returned = mx.load_model(model_config="the model config", device_config="the device config")
    other = get_model_loader(LoadConfig(load_format="remote_instance", remote_instance_weight_loader_backend="nccl"))
    try:
        other.load_model(model_config="the model config", device_config="the device config")
    except Exception:  # SGLang's own nccl path fails on these placeholders; only the dispatch matters
        pass
    return {"returned": returned, "calls": calls}


if __name__ == "__main__":
    result = server_args(sys.argv[2]) if sys.argv[1] == "server-args" else loader()
    print("PROBE " + json.dumps(result))
