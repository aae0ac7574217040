// ID Mix: show the two faces being mixed (the aligned crops of the Face Encode nodes feeding
// embeds_a and embeds_b) under the blend slider, with a marker at the current blend, so the
// slider reads "A <-> B" instead of a bare number. Native widgets cannot show upstream images.
// Drawing only: the widget is not serialized and changes nothing in the prompt.
import { app } from "../../../scripts/app.js";

const NODE_ID = "IDMix";
const FACE_HEIGHT = 84;
const MARGIN = 10;

function linkById(graph, id) {
  return graph.links?.get?.(id) ?? graph.links?.[id];
}

/** The aligned face image of the Face Encode node linked to `inputName`, once it has run. */
function upstreamFace(node, inputName) {
  const input = node.inputs?.find((i) => i.name === inputName);
  const link = input?.link != null ? linkById(node.graph, input.link) : null;
  const origin = link ? node.graph.getNodeById(link.origin_id) : null;
  if (origin?.type !== "FaceEncode") return null;
  const image = origin.imgs?.[0];
  return image?.complete && image.naturalWidth > 0 ? image : null;
}

function drawFace(ctx, image, x, y, size, label) {
  ctx.fillStyle = "#222";
  ctx.fillRect(x, y, size, size);
  if (image) {
    ctx.drawImage(image, x, y, size, size);
  } else {
    ctx.fillStyle = "#777";
    ctx.textAlign = "center";
    ctx.fillText("run to see", x + size / 2, y + size / 2);
  }
  ctx.fillStyle = "#ddd";
  ctx.textAlign = "left";
  ctx.fillText(label, x + 3, y + size - 4);
}

function facesWidget(node) {
  return {
    name: "id_animator_faces",
    type: "id_animator_faces",
    value: null,
    serialize: false,
    options: { serialize: false },
    computeSize(width) {
      return [width, FACE_HEIGHT + MARGIN];
    },
    draw(ctx, node, width, y) {
      const size = FACE_HEIGHT - 8;
      const blend = node.widgets?.find((w) => w.name === "blend")?.value ?? 0.5;
      const faces = [upstreamFace(node, "embeds_a"), upstreamFace(node, "embeds_b")];
      this.facesShown = faces.filter(Boolean).length; // read by the browser tests
      ctx.save();
      ctx.font = "11px sans-serif";
      drawFace(ctx, faces[0], MARGIN, y + 4, size, "A");
      drawFace(ctx, faces[1], width - MARGIN - size, y + 4, size, "B");
      // The blend axis between the faces: 0 = A, 1 = B.
      const left = MARGIN + size + 8;
      const right = width - MARGIN - size - 8;
      const mid = y + 4 + size / 2;
      ctx.strokeStyle = "#888";
      ctx.beginPath();
      ctx.moveTo(left, mid);
      ctx.lineTo(right, mid);
      ctx.stroke();
      ctx.fillStyle = "#4a9eff";
      ctx.beginPath();
      ctx.arc(left + (right - left) * blend, mid, 5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.fillStyle = "#ddd";
      ctx.textAlign = "center";
      ctx.fillText(`${Math.round((1 - blend) * 100)}% A · ${Math.round(blend * 100)}% B`, (left + right) / 2, mid + 18);
      ctx.restore();
    },
  };
}

// ComfyUI may serve web/ under two names (the folder name and pyproject's project name), which
// loads this module twice; register once.
const REGISTERED = Symbol.for("id_animator.IDMixFaces");
if (!globalThis[REGISTERED]) {
  globalThis[REGISTERED] = true;
  registerIDMixFaces();
}

function registerIDMixFaces() {
  app.registerExtension({
    name: "id_animator.IDMixFaces",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE_ID) return;
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        this.addCustomWidget(facesWidget(this));
        this.setSize([Math.max(this.size[0], 300), this.computeSize()[1]]);
        return result;
      };
    },
  });
}
