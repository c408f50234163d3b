"""Serving: a request stream scheduled onto instances, timed by a step-cost grid."""
