"""Writes log lines into a `make dev` instance's logs, as its container would (moto runs no
container): one line per argument, now, in stream `{tenant}/wordpress/dev` of the DEV
environment's log group, in the DEV account (assumed like the server does).

    .venv/bin/python scripts/dev_log.py TENANT LINE [LINE...]

Env: MOTO_PORT (4566, as `make dev`).
"""
import os
import sys
import time
import tomllib

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    tenant, lines = sys.argv[1], sys.argv[2:]
    endpoint = f"http://127.0.0.1:{os.environ.get('MOTO_PORT', '4566')}"
    with open(os.path.join(ROOT, "config", "dev.toml"), "rb") as f:
        dev = next(e for e in tomllib.load(f)["environments"] if e["name"] == "DEV")
    common = {"endpoint_url": endpoint, "region_name": dev["region"]}
    sts = boto3.client("sts", aws_access_key_id="testing", aws_secret_access_key="testing", **common)
    creds = sts.assume_role(RoleArn=dev["role_arn"], RoleSessionName="dev-log")["Credentials"]
    logs = boto3.client(
        "logs",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        **common,
    )
    group, stream = "/bbws/dev/wordpress", f"{tenant}/wordpress/dev"
    try:
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    now = int(time.time() * 1000)
    events = [{"timestamp": now + i, "message": line} for i, line in enumerate(lines)]
    logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=events)
    print(f"wrote {len(events)} line(s) to {group} {stream}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
