#version 330
// The HUD: an RGBA texture drawn 1:1 in window pixels, alpha-blended over the frames.
uniform sampler2D u_overlay;
in vec2 v_uv;
out vec4 f_color;

void main() {
    f_color = texture(u_overlay, v_uv);
}
