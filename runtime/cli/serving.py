"""``runtime triton-repo``, ``runtime deepstream-config``: files for serving stacks."""
from __future__ import annotations

from pathlib import Path

import click

from export.contract.cli import user_errors
from runtime.cli.options import model_dir_arg
from runtime.serving.exports import INT32_MAX, TRITON_ENCODER_PRECISIONS, UINT64_MAX


@click.command("triton-repo")
@model_dir_arg
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--max-batch", type=click.IntRange(1, INT32_MAX), default=32, show_default=True,
              help="max_batch_size of the encoder model (dynamic batching up to it; Triton's int32).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, UINT64_MAX), default=2000, show_default=True,
              help="Longest Triton waits to fill an encoder batch.")
@click.option("--instance-kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--instances", type=click.IntRange(1, INT32_MAX), default=1, show_default=True,
              help="Model instances each (Triton's int32).")
@click.option("--engines", is_flag=True, help="Use the TensorRT engines listed in the manifest (model.plan) "
              "instead of the ONNX files.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it holds a repository written by this command.")
@click.option("--tensorrt-version", default=None,
              help="With --engines: the Triton server's TensorRT version (major.minor.patch) the engines must match; "
                   "default: the TensorRT installed here.")
@click.option("--encoder-precision", type=click.Choice(TRITON_ENCODER_PRECISIONS), default="fp32", show_default=True,
              help="The encoder file to serve without --engines: int8-cpu is encoder.int8-cpu.onnx from `runtime build "
                   "--precision int8-cpu` (CPU instances: ONNX Runtime's x86 integer kernels).")
@user_errors
def triton_repo(model_dir, out_dir, max_batch, max_queue_delay_us, instance_kind, instances, engines, overwrite,
                tensorrt_version, encoder_precision):
    """Write a Triton model repository to OUT_DIR: the encoder (dynamic batching) and the
    refinement (one request = one set) as two models with their config.pbtxt."""
    from runtime.serving.exports import write_triton_repository

    record = write_triton_repository(model_dir, out_dir, max_batch, max_queue_delay_us, instance_kind, instances,
                                     engines, overwrite, tensorrt_version=tensorrt_version,
                                     encoder_precision=encoder_precision)
    for name, entry in record["models"].items():
        click.echo(f"{name}: {out_dir / entry['config']}, {out_dir / entry['file']}")
    click.echo(f"wrote {out_dir}")
    if record.get("plugin_library"):  # the refinement plan needs its plugin registered in the server
        click.echo("serve with one of (README.md in the repository says more):")
        for command in record["plugin_library"]["tritonserver"]:
            click.echo(f"  {command}")


@click.command("deepstream-config")
@model_dir_arg
@click.argument("out_file", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(1, INT32_MAX), default=16, show_default=True,
              help="Objects per encoder batch.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True,
              help="network-mode of the engine nvinfer builds.")
@click.option("--gpu-id", type=click.IntRange(0, INT32_MAX), default=0, show_default=True)
@click.option("--gie-unique-id", type=click.IntRange(1, INT32_MAX), default=2, show_default=True)
@click.option("--operate-on-gie-id", type=click.IntRange(1, INT32_MAX), default=1, show_default=True,
              help="gie-unique-id of the person detector.")
@click.option("--operate-on-class-ids", default="0", show_default=True,
              help="Class id(s) of 'person' in the detector (semicolon-separated).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="An engine built from the written .encoder.onnx for nvinfer to load.")
@click.option("--plugin-lib", default="auto", show_default=True,
              help="custom-lib-path: 'auto' (libnformer_plugins_autoreg.so, which registers the plugin when "
                   "nvinfer loads it, when built), a path, or 'none'.")
@user_errors
def deepstream_config(model_dir, out_file, batch_size, precision, gpu_id, gie_unique_id, operate_on_gie_id,
                      operate_on_class_ids, engine, plugin_lib):
    """Write OUT_FILE, an nvinfer secondary-GIE config for the encoder (embeddings as output tensor
    meta), and OUT_FILE's stem + .encoder.onnx beside it (the encoder with the per-channel std
    folded in, so nvinfer's one scale factor and offsets reproduce the original's normalisation)."""
    from runtime.serving.exports import write_deepstream_config

    out = write_deepstream_config(model_dir, out_file, batch_size, gpu_id, gie_unique_id, operate_on_gie_id,
                                  operate_on_class_ids, precision, engine,
                                  None if plugin_lib == "none" else plugin_lib)
    click.echo(f"wrote {out['config']} and {out['onnx']}"
               + (f" (custom-lib-path {out['custom_lib_path']})" if out["custom_lib_path"] else ""))
