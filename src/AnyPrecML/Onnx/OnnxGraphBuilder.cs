using AnyPrecML.Models;
using AnyPrecML.Onnx.Proto;
using Google.Protobuf;

namespace AnyPrecML.Onnx;

/// <summary>Builds ONNX graphs node by node (inputs, outputs, initializers, nodes with attributes) and saves them.</summary>
public sealed class OnnxGraphBuilder
{
    private readonly GraphProto _graph;

    /// <summary>A new empty graph called <paramref name="name"/>.</summary>
    public OnnxGraphBuilder(string name) => _graph = new GraphProto { Name = name };

    /// <summary>The graph so far.</summary>
    public GraphProto Graph => _graph;

    /// <summary>A graph input; a dimension is a number (fixed) or a string (symbolic).</summary>
    public string Input(string name, TensorProto.Types.DataType type, params object[] dims) { _graph.Input.Add(Value(name, type, dims)); return name; }

    /// <summary>A graph output.</summary>
    public string Output(string name, TensorProto.Types.DataType type, params object[] dims) { _graph.Output.Add(Value(name, type, dims)); return name; }

    /// <summary>A constant tensor from raw little-endian bytes.</summary>
    public string Initializer(string name, TensorProto.Types.DataType type, long[] dims, ReadOnlySpan<byte> raw)
    {
        var t = new TensorProto { Name = name, DataType = (int)type, RawData = ByteString.CopyFrom(raw) };
        t.Dims.AddRange(dims);
        _graph.Initializer.Add(t);
        return name;
    }

    /// <summary>
    /// A constant tensor whose data stays in its checkpoint file: an external-data reference (the file's name, the tensor's
    /// offset and length), valid where the session's external-initializer folder is the file's directory.
    /// </summary>
    public string ExternalInitializer(string name, TensorProto.Types.DataType type, long[] dims, Models.TensorView data)
    {
        var t = new TensorProto { Name = name, DataType = (int)type, DataLocation = TensorProto.Types.DataLocation.External };
        t.Dims.AddRange(dims);
        t.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = Path.GetFileName(data.FilePath) });
        t.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = data.FileOffset.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        t.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = data.ByteLength.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        _graph.Initializer.Add(t);
        return name;
    }

    /// <summary>A constant fp32 tensor.</summary>
    public string Initializer(string name, float[] data, params long[] dims) =>
        Initializer(name, TensorProto.Types.DataType.Float, dims, System.Runtime.InteropServices.MemoryMarshal.AsBytes(data.AsSpan()));

    /// <summary>A constant int64 tensor.</summary>
    public string Initializer(string name, long[] data, params long[] dims) =>
        Initializer(name, TensorProto.Types.DataType.Int64, dims, System.Runtime.InteropServices.MemoryMarshal.AsBytes(data.AsSpan()));

    /// <summary>Adds a node; attributes are (name, value) with int, long, float, string, long[] or float[] values.</summary>
    public NodeProto Node(string opType, string[] inputs, string[] outputs, string domain = "", string? name = null, params (string Name, object Value)[] attributes)
    {
        var node = new NodeProto { OpType = opType, Domain = domain, Name = name ?? $"{opType}_{_graph.Node.Count}" };
        node.Input.AddRange(inputs);
        node.Output.AddRange(outputs);
        foreach (var (n, v) in attributes) node.Attribute.Add(Attribute(n, v));
        _graph.Node.Add(node);
        return node;
    }

    /// <summary>An attribute of the ONNX type matching <paramref name="value"/>.</summary>
    public static AttributeProto Attribute(string name, object value) => value switch
    {
        int i => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = i },
        long l => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = l },
        float f => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = f },
        string s => new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8(s) },
        long[] ls => WithInts(new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints }, ls),
        float[] fs => WithFloats(new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Floats }, fs),
        _ => throw new ArgumentException($"attribute '{name}' has an unsupported type {value.GetType().Name}.", nameof(value)),
    };

    private static AttributeProto WithInts(AttributeProto a, long[] v) { a.Ints.AddRange(v); return a; }
    private static AttributeProto WithFloats(AttributeProto a, float[] v) { a.Floats.AddRange(v); return a; }

    private static ValueInfoProto Value(string name, TensorProto.Types.DataType type, object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var d in dims)
            shape.Dim.Add(d switch
            {
                string p => new TensorShapeProto.Types.Dimension { DimParam = p },
                int i => new TensorShapeProto.Types.Dimension { DimValue = i },
                long l => new TensorShapeProto.Types.Dimension { DimValue = l },
                _ => throw new ArgumentException($"dimension {d} of '{name}' must be a number or a name."),
            });
        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    /// <summary>The model: IR version 10, the default opset 21 plus the given domains (e.g. com.microsoft 1).</summary>
    public ModelProto Build(params (string Domain, int Version)[] extraOpsets)
    {
        var model = new ModelProto { IrVersion = 10, ProducerName = "AnyPrecML", ProducerVersion = typeof(OnnxGraphBuilder).Assembly.GetName().Version?.ToString() ?? "", Graph = _graph };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 21 });
        foreach (var (d, v) in extraOpsets) model.OpsetImport.Add(new OperatorSetIdProto { Domain = d, Version = v });
        return model;
    }

    /// <summary>Writes <paramref name="model"/> to <paramref name="path"/> (temporary file, then rename).</summary>
    public static void Save(ModelProto model, string path) => AtomicFile.Write(path, s => model.WriteTo(s));
}
