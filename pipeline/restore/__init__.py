"""The restore job: plan, engines, stages, ledger, lease, progress, report, and the run that ties
them (:mod:`pipeline.restore.run`)."""
