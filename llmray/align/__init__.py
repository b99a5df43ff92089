"""Instruction tuning (SFT) and preference alignment (DPO) on the shared training core.

``conversations`` and ``preferences`` read real instruction / preference data into chat
messages (bad records quarantined with a reason); ``packing`` renders and packs them for SFT;
``pairs`` encodes preference pairs for DPO; ``loader`` serves either as per-rank, exactly
resumable micro-batches; ``reference`` precomputes and caches reference log-probs on Ray;
``stage`` is the skeleton both stages share (config, data report, training launch, samples);
``sft`` and ``dpo`` are the two stages. The losses live in :mod:`llmray.train.objectives`.
"""
