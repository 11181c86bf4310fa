"""`python -m pipelines.teacher_server ...` is `subq teacher-server ...` (same flags, same --help). `--from-env`: serve the
TeacherServerConfig in $SUBQ_TEACHER_SERVER_CONFIG (how `TeacherServer` starts a server in its own process)."""

import json
import os
import sys

if sys.argv[1:] == ["--from-env"]:
    from pipelines.teacher_server import TeacherServerConfig, serve

    serve(TeacherServerConfig(**json.loads(os.environ["SUBQ_TEACHER_SERVER_CONFIG"])))
else:
    from pipelines.teacher_server_cmd import register
    from subq.cli_options import run_verb

    run_verb(register, "teacher-server")
