// salm_fast._C: pybind11 bindings of the CPU kernels.
//
// Tensors cross as NumPy arrays that share the tensors' memory (t.detach().numpy()). The
// bindings never convert or copy: every array must already be float32 or float64 (one
// dtype per call), C-contiguous, aligned, of the expected shape, and outputs writable and
// not overlapping the inputs (pgd_step / masked_linf_project may write into delta itself).
// A violation raises TypeError (wrong kind or dtype) or ValueError (shape, layout, value)
// naming the op and the argument. The GIL is released while the kernels run; run_typed
// instantiates each kernel for float or double in one place.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <initializer_list>
#include <string>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define SALM_HAS_MXCSR 1
#endif

namespace py = pybind11;
using salm::Dims;
using salm::index_t;

namespace {

int default_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks the arguments of one call; the first array fixes the dtype for the others.
class Call {
   public:
    explicit Call(const char* op) : op_(op) {}

    [[noreturn]] void value_error(const std::string& msg) const { throw py::value_error(op_ + ": " + msg); }
    [[noreturn]] void type_error(const std::string& msg) const { throw py::type_error(op_ + ": " + msg); }

    // ndim < 0: any rank.
    py::array array(const py::handle& obj, const char* name, py::ssize_t ndim, bool output = false) {
        if (!py::isinstance<py::array>(obj))
            type_error(std::string(name) + " must be a numpy.ndarray, got " +
                       std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
        auto a = py::reinterpret_borrow<py::array>(obj);
        const bool f32 = py::isinstance<py::array_t<float>>(a), f64 = py::isinstance<py::array_t<double>>(a);
        if (!f32 && !f64)
            type_error(std::string(name) + " must be float32 or float64 (native byte order), got " +
                       std::string(py::str(a.dtype())));
        if (dtype_ == 0) {
            dtype_ = f32 ? 4 : 8;
            first_ = name;
        } else if ((f32 ? 4 : 8) != dtype_) {
            type_error(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but " + first_ +
                       " has " + (dtype_ == 4 ? "float32" : "float64"));
        }
        if (ndim >= 0 && a.ndim() != ndim)
            value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                        shape_str(a));
        if (!(a.flags() & py::array::c_style))
            value_error(std::string(name) + " must be C-contiguous (the kernels never copy)");
        if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
            value_error(std::string(name) + " must be aligned to its element size");
        if (output && !a.writeable()) value_error(std::string(name) + " must be writable");
        return a;
    }

    void shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> expected) const {
        bool same = static_cast<std::size_t>(a.ndim()) == expected.size();
        py::ssize_t i = 0;
        for (auto e : expected) same = same && a.shape(i++) == e;
        if (!same) {
            std::string want = "(";
            i = 0;
            for (auto e : expected) want += (i++ ? ", " : "") + std::to_string(e);
            value_error(std::string(name) + " has shape " + shape_str(a) + ", expected " + want + ")");
        }
    }

    // out must not overlap `in`, except (allow_same) be exactly the same buffer.
    void no_overlap(const py::array& out, const char* out_name, const py::array& in, const char* in_name,
                    bool allow_same = false) const {
        const auto* o = static_cast<const char*>(out.data());
        const auto* i = static_cast<const char*>(in.data());
        if (allow_same && o == i && out.nbytes() == in.nbytes()) return;
        if (o < i + in.nbytes() && i < o + out.nbytes())
            value_error(std::string(out_name) + " overlaps " + in_name + (allow_same ? " (only out=" : "") +
                        (allow_same ? std::string(in_name) + " exactly is allowed)" : ""));
    }

    bool is_double() const { return dtype_ == 8; }

   private:
    std::string op_;
    int dtype_ = 0;  // element size fixed by the first array
    const char* first_ = "";
};

int threads_arg(const Call& call, int nthreads) {
    if (nthreads < 0)
        call.value_error("nthreads must be >= 0 (0: the OpenMP default), got " + std::to_string(nthreads));
    return nthreads == 0 ? default_threads() : nthreads;
}

void check_p(const Call& call, int p) {
    if (p != 1 && p != 2) call.value_error("p must be 1 or 2, got " + std::to_string(p));
}

void check_k(const Call& call, index_t k, index_t hw) {
    if (k < 1 || k > hw)
        call.value_error("k must be between 1 and H*W=" + std::to_string(hw) + ", got " + std::to_string(k));
}

void check_bound(const Call& call, const char* name, double v, bool signed_ok) {
    if (!std::isfinite(v) || (!signed_ok && v < 0))
        call.value_error(std::string(name) + " must be a finite number" + (signed_ok ? "" : " >= 0") + ", got " +
                         std::string(py::str(py::float_(v))));
}

template <class T>
const T* in_ptr(const py::array& a) {
    return static_cast<const T*>(a.data());
}
template <class T>
T* out_ptr(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}

// f(T{}) with T the call's element type (float or double), run without the GIL: a binding
// names its kernel once, as a template on T, instead of once per dtype.
template <class F>
auto run_typed(const Call& call, F&& f) {
    const bool f64 = call.is_double();
    py::gil_scoped_release nogil;
    return f64 ? f(double{}) : f(float{});
}

// ------------------------------------------------------------------ bindings
void grad_magnitude(const py::handle& g_obj, int p, const py::handle& out_obj, int nthreads) {
    Call call("grad_magnitude");
    auto g = call.array(g_obj, "g", 4);
    auto out = call.array(out_obj, "out", 3, true);
    check_p(call, p);
    const Dims d{g.shape(0), g.shape(1), g.shape(2) * g.shape(3)};
    call.shape(out, "out", {g.shape(0), g.shape(2), g.shape(3)});
    call.no_overlap(out, "out", g, "g");
    const int nt = threads_arg(call, nthreads);
    run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        salm::grad_magnitude(in_ptr<T>(g), out_ptr<T>(out), d, p, nt);
    });
}

bool topk_mask(const py::handle& s_obj, index_t k, const py::handle& out_obj, int nthreads) {
    Call call("topk_mask");
    auto s = call.array(s_obj, "s", 3);
    auto out = call.array(out_obj, "out", 4, true);
    const index_t n = s.shape(0), hw = s.shape(1) * s.shape(2);
    call.shape(out, "out", {s.shape(0), 1, s.shape(1), s.shape(2)});
    check_k(call, k, hw);
    call.no_overlap(out, "out", s, "s", true);  // keys are taken before the image's mask is written
    const int nt = threads_arg(call, nthreads);
    return run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        return salm::topk_mask(in_ptr<T>(s), out_ptr<T>(out), n, hw, k, nt);
    });
}

bool saliency_topk_mask(const py::handle& g_obj, index_t k, int p, const py::handle& out_obj, int nthreads) {
    Call call("saliency_topk_mask");
    auto g = call.array(g_obj, "g", 4);
    auto out = call.array(out_obj, "out", 4, true);
    check_p(call, p);
    const Dims d{g.shape(0), g.shape(1), g.shape(2) * g.shape(3)};
    call.shape(out, "out", {g.shape(0), 1, g.shape(2), g.shape(3)});
    check_k(call, k, d.hw);
    call.no_overlap(out, "out", g, "g");
    const int nt = threads_arg(call, nthreads);
    return run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        return salm::saliency_topk_mask(in_ptr<T>(g), out_ptr<T>(out), d, k, p, nt);
    });
}

// x, delta (and g) N x C x H x W, mask N x 1 x H x W; returns the dims.
Dims check_images(Call& call, const py::array& x, std::initializer_list<std::pair<const py::array*, const char*>> same,
                  const py::array& mask) {
    for (auto [a, name] : same) call.shape(*a, name, {x.shape(0), x.shape(1), x.shape(2), x.shape(3)});
    call.shape(mask, "mask", {x.shape(0), 1, x.shape(2), x.shape(3)});
    return Dims{x.shape(0), x.shape(1), x.shape(2) * x.shape(3)};
}

void masked_linf_project(const py::handle& x_obj, const py::handle& delta_obj, const py::handle& mask_obj,
                         double eps, const py::handle& out_obj, int nthreads) {
    Call call("masked_linf_project");
    auto x = call.array(x_obj, "x", 4);
    auto delta = call.array(delta_obj, "delta", 4);
    auto mask = call.array(mask_obj, "mask", 4);
    auto out = call.array(out_obj, "out", 4, true);
    const Dims d = check_images(call, x, {{&delta, "delta"}, {&out, "out"}}, mask);
    check_bound(call, "eps", eps, false);
    call.no_overlap(out, "out", x, "x");
    call.no_overlap(out, "out", delta, "delta", true);
    call.no_overlap(out, "out", mask, "mask");
    const int nt = threads_arg(call, nthreads);
    run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        salm::masked_linf_project(in_ptr<T>(x), in_ptr<T>(delta), in_ptr<T>(mask), static_cast<T>(eps),
                                  out_ptr<T>(out), d, nt);
    });
}

void masked_linf_project_backward(const py::handle& x_obj, const py::handle& delta_obj, const py::handle& mask_obj,
                                  double eps, const py::handle& grad_out_obj, const py::handle& grad_delta_obj,
                                  const py::handle& grad_x_obj, int nthreads) {
    Call call("masked_linf_project_backward");
    auto x = call.array(x_obj, "x", 4);
    auto delta = call.array(delta_obj, "delta", 4);
    auto mask = call.array(mask_obj, "mask", 4);
    auto grad_out = call.array(grad_out_obj, "grad_out", 4);
    auto grad_delta = call.array(grad_delta_obj, "grad_delta", 4, true);
    const bool want_x = !grad_x_obj.is_none();
    py::array grad_x = want_x ? call.array(grad_x_obj, "grad_x", 4, true) : py::array();
    const Dims d = want_x ? check_images(call, x, {{&delta, "delta"}, {&grad_out, "grad_out"},
                                                   {&grad_delta, "grad_delta"}, {&grad_x, "grad_x"}}, mask)
                          : check_images(call, x, {{&delta, "delta"}, {&grad_out, "grad_out"},
                                                   {&grad_delta, "grad_delta"}}, mask);
    check_bound(call, "eps", eps, false);
    for (auto [a, name] : {std::pair<const py::array*, const char*>{&x, "x"}, {&delta, "delta"}, {&mask, "mask"},
                           {&grad_out, "grad_out"}}) {
        call.no_overlap(grad_delta, "grad_delta", *a, name);
        if (want_x) call.no_overlap(grad_x, "grad_x", *a, name);
    }
    if (want_x) call.no_overlap(grad_x, "grad_x", grad_delta, "grad_delta");
    const int nt = threads_arg(call, nthreads);
    run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        salm::masked_linf_project_backward(in_ptr<T>(x), in_ptr<T>(delta), in_ptr<T>(mask), static_cast<T>(eps),
                                           in_ptr<T>(grad_out), out_ptr<T>(grad_delta),
                                           want_x ? out_ptr<T>(grad_x) : nullptr, d, nt);
    });
}

void pgd_step(const py::handle& x_obj, const py::handle& delta_obj, const py::handle& g_obj,
              const py::handle& mask_obj, double eps, double alpha, const py::handle& out_obj, int nthreads) {
    Call call("pgd_step");
    auto x = call.array(x_obj, "x", 4);
    auto delta = call.array(delta_obj, "delta", 4);
    auto g = call.array(g_obj, "g", 4);
    auto mask = call.array(mask_obj, "mask", 4);
    auto out = call.array(out_obj, "out", 4, true);
    const Dims d = check_images(call, x, {{&delta, "delta"}, {&g, "g"}, {&out, "out"}}, mask);
    check_bound(call, "eps", eps, false);
    check_bound(call, "alpha", alpha, true);
    call.no_overlap(out, "out", x, "x");
    call.no_overlap(out, "out", delta, "delta", true);
    call.no_overlap(out, "out", g, "g");
    call.no_overlap(out, "out", mask, "mask");
    const int nt = threads_arg(call, nthreads);
    run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        salm::pgd_step(in_ptr<T>(x), in_ptr<T>(delta), in_ptr<T>(g), in_ptr<T>(mask), static_cast<T>(eps),
                       static_cast<T>(alpha), out_ptr<T>(out), d, nt);
    });
}

// Whether every value of `a` (any shape) obeys `rule`: the input checks of salm_fast.ops.
bool values_ok(const char* op, const py::handle& a_obj, salm::ValueRule rule, int nthreads) {
    Call call(op);
    auto a = call.array(a_obj, "a", -1);
    const int nt = threads_arg(call, nthreads);
    const index_t len = a.size();
    return run_typed(call, [&](auto zero) {
        using T = decltype(zero);
        return salm::values_ok(in_ptr<T>(a), len, rule, nt);
    });
}
bool all_finite(const py::handle& a, int nthreads) {
    return values_ok("all_finite", a, salm::ValueRule::kFinite, nthreads);
}
bool none_nan(const py::handle& a, int nthreads) {
    return values_ok("none_nan", a, salm::ValueRule::kNotNaN, nthreads);
}
bool all_binary(const py::handle& a, int nthreads) {
    return values_ok("all_binary", a, salm::ValueRule::kBinary, nthreads);
}

// Whether the calling thread flushes denormals (MXCSR FTZ 0x8000 or DAZ 0x0040 set), as
// torch.set_flush_denormal sets them; -1 where there is no such register. torch has no getter,
// and a context manager must restore what its caller had.
int flush_denormal_state() {
#ifdef SALM_HAS_MXCSR
    return (_mm_getcsr() & 0x8040u) ? 1 : 0;
#else
    return -1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "salm_fast C++ CPU kernels (OpenMP). Arrays are float32/float64 NumPy views of contiguous tensors; "
        "outputs are filled in place. Use salm_fast.ops, not this module, from user code.";
    m.def("flush_denormal_state", &flush_denormal_state,
          "1 if this thread flushes denormals (MXCSR FTZ/DAZ), 0 if not, -1 where that cannot be read.");
    m.def("num_threads", &default_threads, "OpenMP threads a call uses when nthreads=0 (omp_get_max_threads()).");
    m.def("grad_magnitude", &grad_magnitude, py::arg("g"), py::arg("p"), py::arg("out"), py::arg("nthreads") = 0,
          "out (N, H, W) <- sum_c |g| (p=1) or sqrt(sum_c g*g) (p=2) of g (N, C, H, W).");
    m.def("topk_mask", &topk_mask, py::arg("s"), py::arg("k"), py::arg("out"), py::arg("nthreads") = 0,
          "out (N, 1, H, W) <- {0,1} mask of the k largest s (N, H, W) per image, ties to the lower index; "
          "False (out unspecified) if s has NaN/inf.");
    m.def("saliency_topk_mask", &saliency_topk_mask, py::arg("g"), py::arg("k"), py::arg("p"), py::arg("out"),
          py::arg("nthreads") = 0,
          "topk_mask(grad_magnitude(g, p), k) without an N x H x W saliency; False if the saliency has NaN/inf.");
    m.def("masked_linf_project", &masked_linf_project, py::arg("x"), py::arg("delta"), py::arg("mask"),
          py::arg("eps"), py::arg("out"), py::arg("nthreads") = 0,
          "out <- clamp(clamp(delta * mask, -eps, eps), -x, 1 - x); out may be delta.");
    m.def("masked_linf_project_backward", &masked_linf_project_backward, py::arg("x"), py::arg("delta"),
          py::arg("mask"), py::arg("eps"), py::arg("grad_out"), py::arg("grad_delta"), py::arg("grad_x").none(true),
          py::arg("nthreads") = 0, "Clamp subgradients of masked_linf_project into grad_delta and grad_x (or None).");
    m.def("pgd_step", &pgd_step, py::arg("x"), py::arg("delta"), py::arg("g"), py::arg("mask"), py::arg("eps"),
          py::arg("alpha"), py::arg("out"), py::arg("nthreads") = 0,
          "out <- masked_linf_project(x, delta + alpha * sign(g), mask, eps); alpha is signed; out may be delta.");
    // The input checks of salm_fast.ops: one read of a (any shape), no allocation.
    m.def("all_finite", &all_finite, py::arg("a"), py::arg("nthreads") = 0, "True if a holds no NaN and no inf.");
    m.def("none_nan", &none_nan, py::arg("a"), py::arg("nthreads") = 0, "True if a holds no NaN (inf allowed).");
    m.def("all_binary", &all_binary, py::arg("a"), py::arg("nthreads") = 0, "True if every value of a is 0 or 1.");
}
