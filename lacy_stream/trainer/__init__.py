"""Training, after the loss and the model: the loop (``train``), the optimizer and its schedule (``optimizer``), how
the module is spread over devices (``parallelize``), metrics (``metrics``) and the run directory's bookkeeping
(``run_directory``). Checkpoints are ``lacy_stream.checkpoint``: inference reads them too."""
