// fill_polygons: scanline polygon fill, pixel-identical to Pillow's ImageDraw.polygon(xy, fill=v)
// on a mode "L" image (what cityscapesscripts' json2labelImg draws).
//
// Behaviour restated from Pillow's src/libImaging/Draw.c (ImagingDrawPolygon/polygon_generic)
// and src/_imaging.c, and checked against Pillow 13 by tests/test_kernels_polygons.py:
//  * vertices are truncated to int (C cast, toward zero);
//  * a horizontal segment that continues the previous horizontal segment in the same x
//    direction extends that edge instead of adding one; the polygon is closed with an extra
//    edge unless the last vertex repeats the first;
//  * horizontal edges are drawn as spans [xmin, xmax] on their row;
//  * every row y from the lowest edge ymin to the highest ymax (clamped to [0, H]) intersects
//    each non-horizontal edge with ymin <= y <= ymax at x = (y - y0) * dx + x0 in float32
//    (dx = float(x1 - x0) / (y1 - y0)); an edge ending on this row (y == ymax, y below the last
//    row) contributes its x twice; an edge starting or ending on this row that meets an earlier
//    such edge at the same rounded x gets its x pushed just outside the neighbouring rows'
//    intersections ("connect discontiguous corners");
//  * the sorted intersections are filled pairwise from round-half-away(x_left) to
//    round-half-toward-zero(x_right), clipped to the image.
#include <cmath>

#include "common.h"
#include "kernels.h"

namespace kernels {
namespace {

constexpr double kMaxCoordinate = 268435456.0;  // 2^28: keeps every int difference in range

struct Edge {
    int x0, y0;  // first vertex as given
    int xmin, xmax, ymin, ymax;
    float dx;  // x step per row, 0 for horizontal edges
};

Edge make_edge(int x0, int y0, int x1, int y1) {
    Edge e;
    e.x0 = x0, e.y0 = y0;
    e.xmin = std::min(x0, x1), e.xmax = std::max(x0, x1);
    e.ymin = std::min(y0, y1), e.ymax = std::max(y0, y1);
    e.dx = y0 == y1 ? 0.f : static_cast<float>(x1 - x0) / static_cast<float>(y1 - y0);
    return e;
}

inline float edge_x(const Edge& e, int y) {
    float t = static_cast<float>(y - e.y0) * e.dx;  // two float32 roundings, no fused multiply-add
    return t + static_cast<float>(e.x0);
}

inline int round_half_away(float f) {
    return f >= 0.f ? static_cast<int>(std::floor(f + 0.5f)) : -static_cast<int>(std::floor(std::fabs(f) + 0.5f));
}
inline int round_half_toward_zero(float f) {
    return f >= 0.f ? static_cast<int>(std::ceil(f - 0.5f)) : -static_cast<int>(std::ceil(std::fabs(f) - 0.5f));
}

struct Canvas {
    uint8_t* data;
    int width, height;
    void span(int x0, int y, int x1, uint8_t value) const {
        if (y < 0 || y >= height || x0 >= width || x1 < 0) return;
        x0 = std::max(x0, 0);
        x1 = std::min(x1, width - 1);
        if (x0 <= x1) std::fill(data + static_cast<int64_t>(y) * width + x0, data + static_cast<int64_t>(y) * width + x1 + 1, value);
    }
};

std::vector<Edge> build_edges(const std::vector<int>& xs, const std::vector<int>& ys) {
    const size_t count = xs.size();
    std::vector<Edge> edges;
    edges.reserve(count);
    size_t i = 0;
    for (; i + 1 < count; ++i) {
        const int x0 = xs[i], y0 = ys[i], x1 = xs[i + 1], y1 = ys[i + 1];
        if (y0 == y1 && i > 0 && ys[i - 1] == y0) {
            const int xprev = xs[i - 1];
            if (x1 > x0 && x0 > xprev) {
                edges.back().xmax = x1;
                continue;
            }
            if (x1 < x0 && x0 < xprev) {
                edges.back().xmin = x1;
                continue;
            }
        }
        edges.push_back(make_edge(x0, y0, x1, y1));
    }
    if (xs[i] != xs[0] || ys[i] != ys[0]) edges.push_back(make_edge(xs[i], ys[i], xs[0], ys[0]));
    return edges;
}

// If the edge `cur` (which starts or ends on row y at x = *x) meets an earlier edge there, move
// *x outside the intersections of both edges with the adjacent row, as Pillow does. `earlier`
// are the edges before `cur` in edge order that are active on row y: Pillow scans all earlier
// edges but only those with an endpoint on row y can match, and those are active.
void connect_corner(const Edge& cur, const Edge* const* earlier, size_t count, int y, float* x) {
    for (size_t k = 0; k < count; ++k) {
        const Edge& other = *earlier[k];
        if ((y != other.ymin && y != other.ymax) || other.dx == 0.f) continue;
        if (std::round(*x) != std::round(edge_x(other, y))) continue;
        const int adjacent = y == cur.ymax ? y - 1 : y + 1;
        const float cur_adjacent = edge_x(cur, adjacent);
        if (adjacent < other.ymin || adjacent > other.ymax) continue;
        const float other_adjacent = edge_x(other, adjacent);
        if (*x > cur_adjacent + 1.f && *x > other_adjacent + 1.f) {
            *x = std::round(std::max(cur_adjacent, other_adjacent)) + 1.f;
        } else if (*x < cur_adjacent - 1.f && *x < other_adjacent - 1.f) {
            *x = std::round(std::min(cur_adjacent, other_adjacent)) - 1.f;
        }
        return;
    }
}

// Fill one polygon's rows inside [row_begin, row_end). Rows only ever depend on their own edges'
// intersections, so bands of rows can be drawn independently (and in parallel).
void fill_one(const Canvas& canvas, const std::vector<Edge>& edges, uint8_t value, int row_begin, int row_end) {
    if (edges.empty()) return;
    int ymin = canvas.height - 1, ymax = 0;
    std::vector<const Edge*> table;  // non-horizontal edges, in edge order
    table.reserve(edges.size());
    for (const Edge& e : edges) {
        ymin = std::min(ymin, e.ymin);
        ymax = std::max(ymax, e.ymax);
        if (e.ymin == e.ymax) {
            if (e.ymin >= row_begin && e.ymin < row_end) canvas.span(e.xmin, e.ymin, e.xmax, value);
        } else {
            table.push_back(&e);
        }
    }
    ymin = std::max(ymin, 0);
    ymax = std::min(ymax, canvas.height);  // Pillow's last scan row (may be one past the image)
    // Edges by first row, so each row only looks at the edges crossing it (Pillow tests every
    // edge on every row; the intersections, and their order after sorting, are the same).
    std::vector<const Edge*> by_start(table);
    std::stable_sort(by_start.begin(), by_start.end(), [](const Edge* a, const Edge* b) { return a->ymin < b->ymin; });
    size_t next = 0;
    std::vector<const Edge*> active;  // kept in edge order: the corner rule depends on it
    std::vector<float> xs;
    xs.reserve(2 * table.size());
    const int first = std::max(ymin, row_begin), last = std::min(ymax, row_end - 1);
    for (int y = first; y <= last; ++y) {
        const size_t before = active.size();
        while (next < by_start.size() && by_start[next]->ymin <= y) active.push_back(by_start[next++]);
        bool added = active.size() != before;
        active.erase(std::remove_if(active.begin(), active.end(), [y](const Edge* e) { return e->ymax < y; }),
                     active.end());
        if (added) std::sort(active.begin(), active.end());  // edge order == address order in `edges`
        xs.clear();
        for (size_t i = 0; i < active.size(); ++i) {
            const Edge& e = *active[i];
            xs.push_back(edge_x(e, y));
            if (y == e.ymax && y < ymax) {
                xs.push_back(xs.back());
            } else if ((y == e.ymin || y == e.ymax) && e.dx != 0.f) {
                connect_corner(e, active.data(), i, y, &xs.back());
            }
        }
        std::sort(xs.begin(), xs.end());
        for (size_t i = 1; i < xs.size(); i += 2)
            canvas.span(round_half_away(xs[i - 1]), y, round_half_toward_zero(xs[i]), value);
    }
}

}  // namespace

py::object fill_polygons(const py::object& canvas_obj, const py::list& polygons, const py::list& values,
                         int num_threads) {
    py::array canvas = as_array(canvas_obj, "canvas");
    require_uint8(canvas, "canvas");
    require_ndim(canvas, "canvas", 2, 2);
    require_contiguous(canvas, "canvas");
    require_writeable(canvas, "canvas");
    if (canvas.shape(0) >= (int64_t{1} << 28) || canvas.shape(1) >= (int64_t{1} << 28))
        throw py::value_error("canvas must be smaller than 2**28 per side, got shape " + shape_str(canvas));
    require_threads(num_threads);
    if (py::len(values) != py::len(polygons))
        throw py::value_error("values must have one entry per polygon: " + std::to_string(py::len(values)) +
                              " values for " + std::to_string(py::len(polygons)) + " polygons");

    // Validate and convert everything first, so a bad polygon leaves the canvas untouched.
    std::vector<std::vector<int>> all_x, all_y;
    std::vector<uint8_t> inks;
    for (size_t i = 0; i < py::len(polygons); ++i) {
        const std::string name = "polygons[" + std::to_string(i) + "]";
        py::object item = polygons[i];
        py::array poly = as_array(item, name.c_str());
        if (!has_dtype<double>(poly)) throw py::type_error(name + " must have dtype float64, got " + dtype_str(poly));
        require_contiguous(poly, name.c_str());
        if (poly.ndim() != 2 || poly.shape(1) != 2 || poly.shape(0) < 2)
            throw py::value_error(name + " must have shape [N,2] with N >= 2, got " + shape_str(poly));
        const double* xy = static_cast<const double*>(poly.data());
        std::vector<int> xs(poly.shape(0)), ys(poly.shape(0));
        for (py::ssize_t j = 0; j < poly.shape(0); ++j) {
            const double x = xy[2 * j], y = xy[2 * j + 1];
            if (!(std::fabs(x) < kMaxCoordinate) || !(std::fabs(y) < kMaxCoordinate))
                throw py::value_error(name + " coordinates must be finite and below 2**28 in magnitude");
            xs[j] = static_cast<int>(x);  // truncation toward zero, as Pillow's (int) cast
            ys[j] = static_cast<int>(y);
        }
        all_x.push_back(std::move(xs));
        all_y.push_back(std::move(ys));

        const std::string vname = "values[" + std::to_string(i) + "]";
        py::object v = values[i];
        if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
            throw py::type_error(vname + " must be an int, got " + py::str(py::type::handle_of(v).attr("__name__")).cast<std::string>());
        const int64_t ink = v.cast<int64_t>();
        if (ink < 0 || ink > 255) throw py::value_error(vname + " must be in [0, 255], got " + std::to_string(ink));
        inks.push_back(static_cast<uint8_t>(ink));
    }

    Canvas c{static_cast<uint8_t*>(canvas.mutable_data()), static_cast<int>(canvas.shape(1)), static_cast<int>(canvas.shape(0))};
    {
        py::gil_scoped_release release;
        std::vector<std::vector<Edge>> edges;
        for (size_t i = 0; i < inks.size(); ++i) edges.push_back(build_edges(all_x[i], all_y[i]));
        // Each thread owns a band of rows and draws every polygon, in order, inside it: later
        // polygons still overwrite earlier ones on every pixel, whatever the thread count.
        parallel_for(c.height, num_threads, 64, [&](int64_t begin, int64_t end) {
            for (size_t i = 0; i < inks.size(); ++i)
                fill_one(c, edges[i], inks[i], static_cast<int>(begin), static_cast<int>(end));
        });
    }
    return canvas_obj;
}

}  // namespace kernels
