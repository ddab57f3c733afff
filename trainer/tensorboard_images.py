"""PNG pictures as TensorBoard images, in an event file of their own beside the run's scalars.

`write_images(logdir, {tag: png bytes}, step)` writes one event per picture in TensorBoard's image
format (a string tensor [width, height, png], the image plugin's metadata), the way
`tensorboard.summary.Writer` writes scalars, which has no image method; TensorFlow is not needed.
Each call writes a new event file (suffix `.pictures`) in `logdir`, so it does not touch the file
the metrics writer keeps open; `tensorboard --logdir <workdir>` shows them under Images.
"""

import io
import time

from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

SUFFIX = ".pictures"


def image_summary(tag: str, png: bytes) -> summary_pb2.Summary:
    """One PNG as an image summary: the tensor [width, height, png] with the image plugin's metadata."""
    width, height = Image.open(io.BytesIO(png)).size
    summary_metadata = metadata.create_summary_metadata(display_name=tag, description="")
    summary_metadata.data_class = summary_pb2.DataClass.DATA_CLASS_BLOB_SEQUENCE
    tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), png])
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=summary_metadata, tensor=tensor)])


def write_images(logdir, images: dict[str, bytes], step: int) -> None:
    """Writes each {tag: png bytes} of `images` at `step` into a new event file in `logdir`."""
    writer = EventFileWriter(str(logdir), filename_suffix=SUFFIX)
    for tag, png in images.items():
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=image_summary(tag, png)))
    writer.close()
