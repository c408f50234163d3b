"""The only place time is ordered: the discrete-event engine (simpy) and the analytic engine."""
