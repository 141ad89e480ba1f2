"""Tools that read a config or a finished run: plan (memory, time, data audit) and report.html."""
