#version 330
// A unit quad placed at a pixel rectangle of the window (top-left origin).
in vec2 in_corner;      // quad corner in [0, 1]^2, (0, 0) = top-left
uniform vec4 u_rect;    // x, y, width, height in window pixels
uniform vec2 u_window;  // window width, height in pixels
out vec2 v_uv;          // texture coordinate; v = 0 is the image's top row (uploaded first)

void main() {
    vec2 pixel = u_rect.xy + in_corner * u_rect.zw;
    gl_Position = vec4(pixel.x / u_window.x * 2.0 - 1.0, 1.0 - pixel.y / u_window.y * 2.0, 0.0, 1.0);
    v_uv = in_corner;
}
