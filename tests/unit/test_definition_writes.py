"""The validator says when a start command or a run_command writes under the read-only model folder (issue 18)."""

from __future__ import annotations

from serving.core import definitions
from serving.core.definitions import writes

ROOT = "/models"


def test_options_redirections_and_cache_variables_under_the_model_folder_are_found() -> None:
    assert writes.command_writes("vllm serve --download-dir /models/w --port 8000", ROOT) == [
        "--download-dir /models/w"
    ]
    assert writes.command_writes(["hf", "download", "--local-dir=/models/x"], ROOT) == ["--local-dir=/models/x"]
    assert writes.command_writes(["train.py", "--save_path", "/models/ckpt"], ROOT) == ["--save_path /models/ckpt"]
    assert writes.command_writes("echo hi >> /models/log.txt", ROOT) == [">> /models/log.txt"]
    assert writes.command_writes("python s.py 2>/models/err", ROOT) == ["2>/models/err"]
    assert writes.command_writes(["sh", "-c", "HF_HOME=/models/hf python s.py"], ROOT) == ["HF_HOME=/models/hf"]
    assert writes.environ_writes({"TRANSFORMERS_CACHE": "/models", "PATH": "/models/bin"}, ROOT) == [
        "TRANSFORMERS_CACHE=/models"
    ]


def test_writes_elsewhere_and_reads_of_the_model_folder_are_not_warned() -> None:
    assert writes.command_writes("vllm serve /models --download-dir /home/work/.cache/w -o /tmp/x", ROOT) == []
    assert writes.command_writes("cat < /models/config.json > /tmp/c", ROOT) == []
    assert writes.command_writes("python s.py --output /modelsX/a", ROOT) == []  # not under /models
    assert writes.command_writes("echo 'unbalanced", ROOT) == []


def test_the_parser_warns_with_the_field_the_argument_and_the_fix() -> None:
    parsed = definitions.parse_model_definition(
        """\
models:
  - name: x
    model_path: /models
    service:
      pre_start_actions:
        - action: run_command
          args: {command: [sh, -c, 'echo hi > {model_path}/x.txt']}
      start_command: vllm serve --download-dir {model_path}/weights
      port: 8000
""",
        "model-definition.yaml",
        model_mount="/mnt/model",
    )
    texts = [str(w) for w in parsed.warnings]
    assert len(texts) == 2, texts
    assert "pre_start_actions[0]: The run_command action writes under the model folder (> /mnt/model/x.txt)" in texts[0]
    assert (
        "start_command: The start command writes under the model folder (--download-dir /mnt/model/weights)"
        in (texts[1])
    )
    assert "read-only at /mnt/model" in texts[1] and "/home/work/.cache" in texts[1]
