"""``optimum-cli obs-prune --model PATH --config pruning_config.json --out DIR`` (obs-plugins).

Optimum loads every module of the ``optimum.commands.register`` namespace package and registers its
``REGISTER_COMMANDS``.  This file only declares the command; everything runs in ``obs_plugins.cli`` (imported
inside ``run`` so that ``optimum-cli`` starts fast).  Install: put ``contrib/`` on ``PYTHONPATH`` or copy this file
to ``<site-packages>/optimum/commands/register/obs_prune.py`` (see the README).
"""
from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class ObsPruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="obs-prune", help="prune a Transformers model by its pruning_config.json (obs-plugins)")

    @staticmethod
    def parse_args(parser):
        parser.add_argument("--model", required=True, help="saved Transformers model folder")
        parser.add_argument("--config", required=True, help="pruning_config.json (or its folder)")
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--calibration", default=None, help="UTF-8 text file for calibration")
        parser.add_argument("--export", default=None, choices=["onnx"], help="also export and verify ONNX")
        parser.add_argument("--threads", type=int, default=0, help="torch threads")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(self):
        import sys

        from obs_plugins import cli
        a = self.args
        argv = ["prune", "--model", a.model, "--config", a.config, "--out", a.out, "--threads", str(a.threads)]
        argv += (["--calibration", a.calibration] if a.calibration else []) + (["--export", a.export] if a.export else [])
        argv += ["--quiet"] if a.quiet else []
        rc = cli.main(argv)
        if rc:
            sys.exit(rc)


REGISTER_COMMANDS = [ObsPruneCommand]
