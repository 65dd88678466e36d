"""Worker-side trace for benchmarks/beam_element_loss.py: with BEAM_LOSS_TRACE=1 and this folder on
PYTHONPATH, every Python process (runner and SDK workers) logs, per bundle, the data messages and bytes
its data channel delivered and the elements each DataInputOperation decoded (and any split request)."""

import os

if os.environ.get("BEAM_LOSS_TRACE"):
    import logging  # lazy: every Python process imports this file; only traced runs need these

    from apache_beam.runners.worker import bundle_processor as bp
    from apache_beam.runners.worker import data_plane as dp

    log = logging.getLogger("wtrace")
    orig_pe = bp.DataInputOperation.process_encoded

    def process_encoded(self, data):
        before = self.index
        orig_pe(self, data)
        log.warning(
            "pid %d %s: process_encoded %d bytes, index %d -> %d, stop %s",
            os.getpid(),
            self.transform_id,
            len(data),
            before,
            self.index,
            self.stop,
        )

    bp.DataInputOperation.process_encoded = process_encoded
    orig_ie = dp._GrpcDataChannel.input_elements

    def input_elements(self, instruction_id, expected_inputs, abort_callback=None):
        n = b = 0
        for el in orig_ie(self, instruction_id, expected_inputs, abort_callback):
            n += 1
            b += len(getattr(el, "data", b"") or b"")
            yield el
        log.warning(
            "pid %d %s: input_elements yielded %d messages, %d bytes, expected %s",
            os.getpid(),
            instruction_id,
            n,
            b,
            list(expected_inputs),
        )

    dp._GrpcDataChannel.input_elements = input_elements
    orig_split = bp.BundleProcessor.try_split

    def try_split(self, req):
        resp = orig_split(self, req)
        log.warning("pid %d: SPLIT request %s -> %s", os.getpid(), req, resp)
        return resp

    bp.BundleProcessor.try_split = try_split
