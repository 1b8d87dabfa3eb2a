"""Evaluation of trained LaCy models (paper Sec. 3, Sec. 5, Appendix A.4.3 and B).

One module per evaluation, each usable on its own from Python:

* :mod:`.validation` – call, non-call and total validation losses over the model's own call mask, and the
  same masks scored with a baseline model (Appendix A.4.3, Figure 5);
* :mod:`.nlu` – ARC-Easy and PIQA by log-likelihood of each choice (acc and acc_norm);
* :mod:`.lm_eval_model` – the model as an lm-evaluation-harness ``LM`` (``--model lacy``) and local task
  configs (needs the ``eval`` extra);
* :mod:`.acceptability` – the Section 3 analysis: accuracy and LLM-judged acceptability by loss bucket,
  for fact and non-fact tokens;
* :mod:`.factscore` – the 183 FactScore biography prompts, export to FactScore's input format, and
  FactScore-style scoring against a judge endpoint and a local knowledge source;
* :mod:`.generation` – the biographies written in the cascade (partner and call policy) and generation
  throughput with and without the cascade;
* :mod:`.fact_leakage` – PopQA long-tail and BIG-bench QA Wikidata answered 3-shot without calls, scored by
  contained gold answers (Sec. 5.3);
* :mod:`.runner` – runs the sections of an ``EvalConfig`` (:mod:`.config`, with the paper's settings) into
  ``report.json``, ``report.md`` and ``report.html`` (``run_eval``); :mod:`lacy_stream.cli.evaluation` turns the
  ``lacy-stream eval`` options into the config;
* :mod:`.compare` – finished runs of several methods side by side (``lacy-stream compare``).

Shared pieces: :mod:`.scoring` (the model's next-token statistics with and without ``<CALL>``),
:mod:`.heldout` (held-out documents and packed windows) and :mod:`.chat_endpoint` (the LLM judge client).
"""
