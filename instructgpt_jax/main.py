"""Command line: `python -m instructgpt_jax.main --config=experiments/pretrain.py:size=tiny --workdir=runs/tiny`.

Any config value can be overridden: `--config.optim.lr=3e-4`. Rerunning the same command on the
same workdir resumes from its latest checkpoint. Problems with the user's input (flags, config,
data, checkpoints) are printed as one line `error: ...` and exit with status 2; anything else is a
bug and keeps its traceback.
"""
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally with :args.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def fail(message: str) -> None:
    from instructgpt_jax import errors

    sys.exit(errors.report(message))


def _config_file_error(message: str) -> str | None:
    """The UserError line at the end of the traceback ml_collections embeds when get_config() raises."""
    from instructgpt_jax import errors

    last = message.strip().splitlines()[-1] if message.strip() else ""
    for name in ("ConfigError", "DataError", "CheckpointError", "UserError"):
        prefix = f"{errors.__name__}.{name}: "
        if last.startswith(prefix):
            return last[len(prefix):]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """app.run's flags parser: a bad flag, config file, config argument or key is one line and exit 2.

    Can be called again in one process (tests): overrides defined by an earlier parse are dropped first."""
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)
    FLAGS.unparse_flags()
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), None)
    if config_arg is not None and not os.path.isfile(config_arg.split(":", 1)[0]):
        fail(f"--config={config_arg}: no such config file {config_arg.split(':', 1)[0]!r}")
    saved, sys.argv = sys.argv, list(argv)  # ml_collections reads the --config.* overrides from sys.argv
    try:
        rest = FLAGS(argv)
        config_file = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
        if not os.path.isfile(config_file):  # `--config FILE` (no '='): ml_collections defers the error
            fail(f"--config={config_flags.get_config_filename(FLAGS['config'])}: no such config file {config_file!r}")
        return rest
    except AttributeError as e:  # ml_collections: an override names a key the config does not have
        if not (e.args and isinstance(e.args[0], KeyError)):
            raise
        key, _, hint = str(e.args[0].args[0]).partition("\n")
        key = key.strip("'\"")
        given = [a.split("=", 1)[0].lstrip("-") for a in argv if re.match(rf"-{{1,2}}config\.(.*\.)?{re.escape(key)}(=|$)", a)]
        fail(f"unknown config key {given[0] if given else key!r}" + (f" ({hint.strip()})" if hint else ""))
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:
            user_message = _config_file_error(message)
            if user_message is None:
                raise  # a bug in the experiment file: keep its traceback
            fail(f"--config={config_arg}: {user_message}")
        fail(message.splitlines()[0])
    finally:
        sys.argv = saved


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter out; --verbosity=0 shows it
    from instructgpt_jax import stages
    from instructgpt_jax.errors import UserError
    from instructgpt_jax.stages.common import enable_compilation_cache
    from instructgpt_jax.train import distributed

    try:
        distributed.maybe_initialize()
        enable_compilation_cache()
        stages.run(FLAGS.config, FLAGS.workdir)
    except UserError as e:
        fail(str(e))


def run():
    from instructgpt_jax import host_memory

    host_memory.keep_scratch_memory_mapped()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
