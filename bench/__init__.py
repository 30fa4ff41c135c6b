"""aodm's benchmark: aodm measured against the minimal pipeline on the same RabbitMQ and
PostgreSQL, in the same run. `python -m bench --smoke | --full | --workers 1,2,4`; see
docs/performance.md."""
