"""`launch.predict` for an object-detection export (`loaded.task[0]` is
"object_detection"): the boxes of each file's objects.

Rows, in the format `launch.predict` picked (`--output`'s extension or
`--format`):
    text  per image its path, then `  class  score  x1 y1 x2 y2` lines
    csv   `path,class,score,x1,y1,x2,y2`, one row per object (an image with
          no object has no row)
    json  `{"detections": [{"path", "objects": [{"class", "score", "box"}]}],
          "skipped": [...], "images_per_sec"}`
Boxes are x1, y1, x2, y2 in the image's own pixels. Objects scoring below
`--min_score` are left out. With `--boxes=DIR`, each image is also written
to `DIR/STEM.png` with its objects' boxes drawn (one colour per class,
`tf.image.draw_bounding_boxes`). It needs TensorFlow only, like the rest of
`launch.predict`.
"""

import csv
import json
import os

from launch import cli

DRAW_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


class _Rows:
    def __init__(self, stream, fmt: str):
        self.stream, self.fmt, self.count = stream, fmt, 0
        if fmt == "csv":
            self.writer = csv.writer(stream, lineterminator="\n")
            self.writer.writerow(["path", "class", "score", "x1", "y1", "x2", "y2"])
        elif fmt == "json":
            stream.write('{"detections": [')

    def write(self, path: str, objects: list[dict]):
        if self.fmt == "csv":
            for o in objects:
                self.writer.writerow([path, o["class"], f"{o['score']:.6g}", *(f"{v:.2f}" for v in o["box"])])
        elif self.fmt == "json":
            row = json.dumps({"path": path, "objects": objects})
            self.stream.write(("," if self.count else "") + "\n  " + row)
        else:
            lines = [path] + [f"  {o['class']}  {o['score']:.4f}  " + " ".join(f"{v:.1f}" for v in o["box"])
                              for o in objects]
            self.stream.write("\n".join(lines) + "\n")
        self.count += 1

    def finish(self, skipped, images_per_sec: float):
        if self.fmt == "json":
            self.stream.write(f'\n ],\n "skipped": {json.dumps(skipped)},\n'
                              f' "images_per_sec": {round(images_per_sec, 1)}}}\n')


def objects_of(out, i: int, min_score: float) -> list[dict]:
    """Image `i`'s objects in a serving output, as dicts of class, score, box."""
    count = int(out["num_detections"][i])
    objects = []
    for k in range(count):
        score = float(out["scores"][i, k])
        if score >= min_score:
            objects.append({"class": out["class_names"][i, k].numpy().decode(),
                            "class_id": int(out["classes"][i, k]), "score": round(score, 6),
                            "box": [round(float(v), 2) for v in out["boxes"][i, k].numpy()]})
    return objects


def draw(image, objects: list[dict]):
    """uint8 `[H, W, 3]` with each object's box drawn in its class's colour."""
    tf = cli.import_tensorflow()
    if not objects:
        return image
    h, w = image.shape[:2]
    boxes = [[o["box"][1] / h, o["box"][0] / w, o["box"][3] / h, o["box"][2] / w] for o in objects]
    colours = [[c / 255.0 for c in DRAW_COLOURS[o["class_id"] % len(DRAW_COLOURS)]] + [1.0]
               for o in objects]
    drawn = tf.image.draw_bounding_boxes(tf.cast(image[None], tf.float32), [boxes], colours)
    return tf.cast(drawn[0], tf.uint8).numpy()


def detect(files, served, stream, fmt: str, boxes_dir: str | None, min_score: float,
           batch_size: int, progress, read_batches):
    """Writes the rows of `files`' objects to `stream` and, with
    `boxes_dir`, the drawn images; returns `(files done, skipped, seconds)`."""
    tf = cli.import_tensorflow()
    detect_batch = served.signatures["serving_default"]
    if boxes_dir:
        os.makedirs(boxes_dir, exist_ok=True)
    rows, skipped = _Rows(stream, fmt), []

    def skip(path, reason):
        progress.clear()
        cli.fail(f"skipped {path}: {reason}.")
        skipped.append({"path": path, "reason": reason})

    def run(chunk):
        try:
            return [(chunk, detect_batch(images=tf.constant([b for _, b in chunk])))]
        except tf.errors.InvalidArgumentError:
            if len(chunk) == 1:
                skip(chunk[0][0], "not a decodable image")
                return []
            return [r for one in chunk for r in run([one])]  # find the bad file

    for done, chunk, unreadable in read_batches(files, batch_size):
        for path, reason in unreadable:
            skip(path, reason)
        for part, out in (run(chunk) if chunk else []):
            for i, (path, blob) in enumerate(part):
                objects = objects_of(out, i, min_score)
                rows.write(path, objects)
                if boxes_dir:
                    image = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
                    name = os.path.join(boxes_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
                    tf.io.write_file(name + ".tmp", tf.io.encode_png(draw(image, objects)))
                    os.replace(name + ".tmp", name)
        progress.update(done, rows.count)
    seconds = progress.elapsed()
    rows.finish(skipped, rows.count / max(seconds, 1e-9))
    return rows.count, skipped, seconds
